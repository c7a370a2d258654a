//! Pre-warmed values (`refresh` rules): what a plan sets, and how a row is
//! rendered into it.
//!
//! A refreshed value carries its [`RefreshVersion`] (the commit LSN, then the
//! change's position in its transaction) in the reserved member or field
//! `_lsn`, so the sink's script sets a key only if Redis holds no newer
//! version: a replay after a crash never puts an older row back. The JSON
//! format types values by the column's type OID (`docs/pre-warm.md`):
//!
//! | PostgreSQL type | JSON |
//! | --- | --- |
//! | `int2`, `int4`, `int8`, `oid`, `float4`, `float8`, `numeric` | number (`NaN`, `Infinity`: string) |
//! | `bool` | `true` / `false` |
//! | `json`, `jsonb` | embedded |
//! | NULL | `null` |
//! | anything else | PostgreSQL's text, as a string |

use std::collections::HashMap;
use std::fmt;

use super::FastHash;
use crate::lsn::Lsn;

/// Where a refreshed value sits in commit order: the commit LSN, then the
/// change's position in its transaction (two changes of one row in one
/// transaction, applied in separate chunks, keep their order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RefreshVersion {
    /// The transaction's commit LSN.
    pub lsn: Lsn,
    /// The change's position in its transaction (0-based, saturating).
    pub seq: u32,
}

impl RefreshVersion {
    /// Length of the printed form: 16 hex digits, a dot, 8 hex digits.
    pub const LEN: usize = 25;
}

/// `0000000001A2B3C4.00000005`: fixed width, upper-case hexadecimal, so two
/// versions compare as strings in commit order (what the Lua script does).
impl fmt::Display for RefreshVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}.{:08X}", self.lsn.0, self.seq)
    }
}

/// A refreshed value, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshValue {
    /// A JSON object, serialized, `_lsn` first.
    Json(String),
    /// Hash fields (column, PostgreSQL's text), `_lsn` first; NULL columns absent.
    Hash(Vec<(String, String)>),
}

impl RefreshValue {
    /// Bytes the value takes (JSON text, or field names and values).
    pub fn len(&self) -> usize {
        match self {
            RefreshValue::Json(s) => s.len(),
            RefreshValue::Hash(fields) => fields.iter().map(|(k, v)| k.len() + v.len()).sum(),
        }
    }

    /// True for an empty JSON text or a hash without fields (never planned).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One key to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshSet {
    /// The value.
    pub value: RefreshValue,
    /// The change it was rendered from.
    pub version: RefreshVersion,
    /// TTL in seconds; `None`: no TTL.
    pub ttl_s: Option<u64>,
}

/// Keys to pre-warm, with the last image of each.
pub type RefreshMap = HashMap<String, RefreshSet, FastHash>;

/// Plans `set` under `key` unless the map holds a newer version of it.
pub fn put(map: &mut RefreshMap, key: String, set: RefreshSet) {
    match map.get_mut(&key) {
        Some(cur) if cur.version > set.version => {}
        Some(cur) => *cur = set,
        None => {
            map.insert(key, set);
        }
    }
}

/// How a column renders in the JSON format, from its type OID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// `int2`, `int4`, `int8`, `oid`, `float4`, `float8`, `numeric`.
    Number,
    /// `bool`.
    Bool,
    /// `json`, `jsonb`.
    Json,
    /// Everything else: a JSON string.
    Text,
}

impl ValueKind {
    /// The kind of a PostgreSQL type OID (built-in OIDs are fixed).
    pub fn of(type_oid: u32) -> ValueKind {
        match type_oid {
            20 | 21 | 23 | 26 | 700 | 701 | 1700 => ValueKind::Number,
            16 => ValueKind::Bool,
            114 | 3802 => ValueKind::Json,
            _ => ValueKind::Text,
        }
    }
}

/// The type OID of a built-in type name as `record` writes them (`int4`,
/// `jsonb`, ...); `None` for others (rendered as text).
pub fn type_oid_by_name(name: &str) -> Option<u32> {
    Some(match name {
        "bool" => 16,
        "int8" => 20,
        "int2" => 21,
        "int4" => 23,
        "text" => 25,
        "oid" => 26,
        "json" => 114,
        "float4" => 700,
        "float8" => 701,
        "numeric" => 1700,
        "jsonb" => 3802,
        _ => return None,
    })
}

/// The name [`type_oid_by_name`] reads back, for the kinds that render
/// other than as text.
pub fn type_name_of_oid(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        26 => "oid",
        114 => "json",
        700 => "float4",
        701 => "float8",
        1700 => "numeric",
        3802 => "jsonb",
        _ => return None,
    })
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1F => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                out.push_str("\\u00");
                out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
                out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xF)]));
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// True when `s` is a JSON number (`-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?`).
pub fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// Appends one column value (PostgreSQL's text of a non-NULL value) as JSON.
pub fn push_json_value(out: &mut String, kind: ValueKind, text: &str) {
    match kind {
        ValueKind::Number if is_json_number(text) => out.push_str(text),
        ValueKind::Bool if text == "t" => out.push_str("true"),
        ValueKind::Bool if text == "f" => out.push_str("false"),
        ValueKind::Json
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
                && !text.trim().is_empty() =>
        {
            out.push_str(text.trim())
        }
        _ => push_json_str(out, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: ValueKind, text: &str) -> String {
        let mut s = String::new();
        push_json_value(&mut s, kind, text);
        s
    }

    #[test]
    fn versions_print_fixed_width_and_compare_as_strings() {
        let a = RefreshVersion {
            lsn: Lsn(0x01A2_B3C4),
            seq: 5,
        };
        assert_eq!(a.to_string(), "0000000001A2B3C4.00000005");
        assert_eq!(a.to_string().len(), RefreshVersion::LEN);
        let b = RefreshVersion {
            lsn: Lsn(0x01A2_B3C4),
            seq: 0x10,
        };
        let c = RefreshVersion {
            lsn: Lsn(0x2_0000_0000),
            seq: 0,
        };
        assert!(a < b && b < c);
        assert!(a.to_string() < b.to_string() && b.to_string() < c.to_string());
    }

    #[test]
    fn values_are_typed_by_oid() {
        assert_eq!(json(ValueKind::of(23), "-42"), "-42");
        assert_eq!(
            json(ValueKind::of(1700), "1.50"),
            "1.50",
            "numeric keeps its scale"
        );
        assert_eq!(json(ValueKind::of(1700), "NaN"), "\"NaN\"");
        assert_eq!(json(ValueKind::of(701), "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(ValueKind::of(701), "1e+20"), "1e+20");
        assert_eq!(json(ValueKind::of(16), "t"), "true");
        assert_eq!(json(ValueKind::of(16), "f"), "false");
        assert_eq!(
            json(ValueKind::of(3802), r#"{"a": [1, 2]}"#),
            r#"{"a": [1, 2]}"#
        );
        assert_eq!(json(ValueKind::of(114), "not json"), "\"not json\"");
        assert_eq!(
            json(ValueKind::of(25), "a\"b\\c\n\u{1}é"),
            r#""a\"b\\c\n\u0001é""#
        );
        assert_eq!(
            json(ValueKind::of(1184), "2026-11-25 20:00:00+00"),
            "\"2026-11-25 20:00:00+00\""
        );
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-0", "12", "1.5", "1e5", "1E+5", "-1.25e-3"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "+1", "NaN", "Infinity", "1 ", "0x1",
        ] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }

    #[test]
    fn put_keeps_the_newest_image() {
        let set = |seq, v: &str| RefreshSet {
            value: RefreshValue::Json(v.into()),
            version: RefreshVersion { lsn: Lsn(9), seq },
            ttl_s: None,
        };
        let mut m = RefreshMap::default();
        put(&mut m, "k".into(), set(2, "b"));
        put(&mut m, "k".into(), set(1, "a"));
        assert_eq!(m["k"].value, RefreshValue::Json("b".into()));
        put(&mut m, "k".into(), set(3, "c"));
        assert_eq!(m["k"].value, RefreshValue::Json("c".into()));
    }

    #[test]
    fn type_names_round_trip() {
        for oid in [16, 20, 21, 23, 26, 114, 700, 701, 1700, 3802] {
            assert_eq!(type_oid_by_name(type_name_of_oid(oid).unwrap()), Some(oid));
        }
        assert_eq!(type_oid_by_name("timestamptz"), None);
    }
}
