//! The mapping file as written (`[[table]]` entries), deserialized with spans
//! so validation can point at the offending value. [`super::load`] turns it
//! into [`super::Rule`]s.

use std::fmt;
use std::marker::PhantomData;

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

impl StrOrTable for RawChannel {
    type Table = RawShapedChannel;
    const EXPECTING: &'static str =
        "a channel name or a table { channel = \"name\", message = { ... } }";
    fn from_str(v: &str) -> Result<Self, String> {
        Ok(RawChannel::Name(v.to_owned()))
    }
    fn from_table(table: RawShapedChannel) -> Self {
        RawChannel::Shaped(table)
    }
}

impl<'de> Deserialize<'de> for RawChannel {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrTableVisitor(PhantomData))
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

impl StrOrTable for RawTruncate {
    type Table = RawTruncateTable;
    const EXPECTING: &'static str =
        "\"none\" or a table with keys, tags, versions, patterns, channels";
    fn from_str(v: &str) -> Result<Self, String> {
        if v == "none" {
            Ok(RawTruncate::None)
        } else {
            Err(format!(
                "truncate = {v:?} is not allowed: write truncate = \"none\" to disable it, or a [table.truncate] table with keys, tags, versions, patterns, channels"
            ))
        }
    }
    fn from_table(table: RawTruncateTable) -> Self {
        RawTruncate::Table(table)
    }
}

impl<'de> Deserialize<'de> for RawTruncate {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrTableVisitor(PhantomData))
    }
}

/// A value written either as a string or as a table (`channels` entries,
/// `truncate`): the string is read by [`StrOrTable::from_str`], the table
/// deserialized as [`StrOrTable::Table`].
trait StrOrTable: Sized {
    /// What the table form deserializes into.
    type Table;
    /// What the error says was expected when the value is neither.
    const EXPECTING: &'static str;
    /// The string form; `Err` is the message of the deserialization error.
    fn from_str(v: &str) -> Result<Self, String>;
    /// The table form.
    fn from_table(table: Self::Table) -> Self;
}

/// The one visitor of every [`StrOrTable`] value.
struct StrOrTableVisitor<T>(PhantomData<T>);

impl<'de, T> Visitor<'de> for StrOrTableVisitor<T>
where
    T: StrOrTable,
    T::Table: Deserialize<'de>,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        T::from_str(v).map_err(E::custom)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::Table::deserialize(de::value::MapAccessDeserializer::new(map)).map(T::from_table)
    }
}
