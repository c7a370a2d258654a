//! The mapping file as written (`[[table]]` entries), deserialized with spans
//! so validation can point at the offending value. [`super::load`] turns it
//! into [`super::Rule`]s.

use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// A whole mapping file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    #[serde(default)]
    pub table: Vec<RawRule>,
}

/// One `[[table]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub name: Spanned<String>,
    #[serde(default)]
    pub keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    #[serde(default)]
    pub versions: Vec<Spanned<String>>,
    #[serde(default)]
    pub patterns: Vec<Spanned<String>>,
    #[serde(default)]
    pub channels: Vec<Spanned<RawChannel>>,
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    pub columns: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub assume_unchanged: Vec<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub truncate: Option<Spanned<RawTruncate>>,
    #[serde(default)]
    pub refresh: Vec<Spanned<RawRefresh>>,
}

/// `refresh` entry: `{ key = "user:{id}:profile", columns = [...], format = "json", ttl_s = 300 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRefresh {
    pub key: Spanned<String>,
    pub columns: Option<Spanned<Vec<Spanned<String>>>>,
    pub format: Option<Spanned<String>>,
    pub ttl_s: Option<Spanned<i64>>,
}

/// `channels` entry: `"name"` or `{ channel = "name", message = { ... } }`.
#[derive(Debug)]
pub(crate) enum RawChannel {
    Name(String),
    Shaped(RawShapedChannel),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShapedChannel {
    pub channel: Spanned<String>,
    pub message: Option<Spanned<RawShape>>,
}

impl<'de> Deserialize<'de> for RawChannel {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawChannel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a channel name or a table { channel = \"name\", message = { ... } }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawChannel, E> {
                Ok(RawChannel::Name(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawChannel, A::Error> {
                RawShapedChannel::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawChannel::Shaped)
            }
        }
        d.deserialize_any(V)
    }
}

/// A message shape: a TOML value whose string leaves are templates.
#[derive(Debug)]
pub(crate) enum RawShape {
    Str(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    Array(Vec<Spanned<RawShape>>),
    Table(Vec<(String, Spanned<RawShape>)>),
}

impl<'de> Deserialize<'de> for RawShape {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawShape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string template, number, boolean, array or table")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawShape, E> {
                Ok(RawShape::Str(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawShape, E> {
                Ok(RawShape::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawShape, E> {
                Ok(RawShape::Int(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawShape, E> {
                Ok(RawShape::Float(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawShape, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<RawShape>>()? {
                    items.push(item);
                }
                Ok(RawShape::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawShape, A::Error> {
                let mut entries = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v = map.next_value::<Spanned<RawShape>>()?;
                    entries.push((k, v));
                }
                Ok(RawShape::Table(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// `truncate = "none"` or a `[table.truncate]` table.
#[derive(Debug)]
pub(crate) enum RawTruncate {
    None,
    Table(RawTruncateTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTruncateTable {
    #[serde(default)]
    pub keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    #[serde(default)]
    pub versions: Vec<Spanned<String>>,
    #[serde(default)]
    pub patterns: Vec<Spanned<String>>,
    #[serde(default)]
    pub channels: Vec<Spanned<RawChannel>>,
}

impl<'de> Deserialize<'de> for RawTruncate {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTruncate;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"none\" or a table with keys, tags, versions, patterns, channels")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTruncate, E> {
                if v == "none" {
                    Ok(RawTruncate::None)
                } else {
                    Err(E::custom(format!(
                        "truncate = {v:?} is not allowed: write truncate = \"none\" to disable it, or a [table.truncate] table with keys, tags, versions, patterns, channels"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawTruncate, A::Error> {
                RawTruncateTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawTruncate::Table)
            }
        }
        d.deserialize_any(V)
    }
}
