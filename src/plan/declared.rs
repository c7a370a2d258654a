//! Declared invalidations: the payload of the logical decoding messages that
//! `cache_invalidator.invalidate(...)` emits inside the application's
//! transaction (installed by `setup`, see `docs/operations.md`).
//!
//! The content of one transactional message with the `cache-invalidator`
//! prefix is `invalidate:v1:` followed by one JSON object:
//!
//! ```text
//! invalidate:v1:{"keys":["post:7:comments"],"tags":["user:5"],"versions":["post:7"],
//!                "patterns":["feed:*"],"channels":[{"channel":"cache:invalidate","message":{"post":7}}]}
//! ```
//!
//! Every field is optional (absent = empty); any other field, a value of the
//! wrong type, an empty entry, an entry longer than [`MAX_ENTRY_BYTES`], more
//! than [`MAX_ENTRIES`] entries or a content over [`MAX_PAYLOAD_BYTES`] makes
//! the message malformed. The version sits in the content so that a worker can
//! tell a payload it does not understand (a newer `setup` wrote it) from one it
//! does: both are answered with a full flush by the planner, never guessed.
//!
//! Pure: no I/O, never panics on any input (a proptest below and the
//! `declared` fuzz target in `fuzz/` check it).

use serde::Deserialize;

/// What every declared invalidation's content starts with.
pub const INVALIDATE_PREFIX: &str = "invalidate:";
/// The payload version this worker understands.
pub const VERSION: &str = "v1";
/// Most entries (keys + tags + versions + patterns + channels) in one message.
/// The SQL function refuses more inside the caller's transaction.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest entry (a key, tag, version, pattern, channel name or message), in bytes.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Largest content of one message, in bytes (prefix and version included).
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// One declared pub/sub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredMessage {
    /// The channel to PUBLISH to.
    pub channel: String,
    /// The message as published: a JSON string's text as is, any other JSON
    /// value serialized; `None` asks for the default message (the keys, tags
    /// and versions of this declaration, the LSN and the epoch).
    pub message: Option<String>,
}

/// The invalidations one message declares, as the application wrote them:
/// tags and versions without their prefixes, keys and patterns as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Keys to UNLINK, as given.
    pub keys: Vec<String>,
    /// Tags (the `tag_prefix` is added by the planner).
    pub tags: Vec<String>,
    /// Versions (the `version_prefix` is added by the planner).
    pub versions: Vec<String>,
    /// Glob patterns, as given: their `*`, `?` and `[...]` keep their meaning.
    pub patterns: Vec<String>,
    /// Messages to PUBLISH after the deletes.
    pub channels: Vec<DeclaredMessage>,
}

impl Declared {
    /// Number of entries, the measure [`MAX_ENTRIES`] bounds.
    pub fn entries(&self) -> usize {
        self.keys.len()
            + self.tags.len()
            + self.versions.len()
            + self.patterns.len()
            + self.channels.len()
    }
}

/// Why a message with our prefix could not be understood. The planner answers
/// every one of these with a full flush.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclaredError {
    /// The content is not UTF-8.
    #[error("the content is not UTF-8")]
    NotUtf8,
    /// `invalidate:<version>:` with a version this worker does not know.
    #[error("unknown payload version {0:?} (this worker reads {VERSION}): a newer `setup` installed the SQL API; upgrade the worker")]
    UnknownVersion(String),
    /// The content is over [`MAX_PAYLOAD_BYTES`].
    #[error("the content is {0} bytes, over the limit of {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
    /// More than [`MAX_ENTRIES`] entries.
    #[error("{0} entries, over the limit of {MAX_ENTRIES}")]
    TooManyEntries(usize),
    /// An empty entry, or one over [`MAX_ENTRY_BYTES`].
    #[error("an entry of {field} is {len} bytes: entries must be 1 to {MAX_ENTRY_BYTES} bytes")]
    BadEntry {
        /// `keys`, `tags`, `versions`, `patterns` or `channels`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The JSON object is not valid JSON or not of the documented shape.
    #[error("invalid payload: {0}")]
    Json(String),
    /// A message content with our prefix that is none of the known kinds.
    #[error("unknown message {0:?}: expected heartbeat, flush:all, flush:table:<schema.table> or invalidate:{VERSION}:<json>")]
    UnknownKind(String),
}

/// The JSON object of a v1 payload, before its entries are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawV1 {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    versions: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default)]
    channels: Vec<RawChannel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    channel: String,
    #[serde(default)]
    message: Option<serde_json::Value>,
}

/// Parses the part after [`INVALIDATE_PREFIX`] (`v1:{...}`).
pub fn parse_invalidate(rest: &[u8]) -> Result<Declared, DeclaredError> {
    let total = rest.len().saturating_add(INVALIDATE_PREFIX.len());
    if total > MAX_PAYLOAD_BYTES {
        return Err(DeclaredError::TooLarge(total));
    }
    let text = std::str::from_utf8(rest).map_err(|_| DeclaredError::NotUtf8)?;
    let (version, json) = text.split_once(':').unwrap_or((text, ""));
    if version != VERSION {
        // Bounded: the version goes into a log line.
        let shown: String = version.chars().take(32).collect();
        return Err(DeclaredError::UnknownVersion(shown));
    }
    // serde would also read a struct from a JSON array: only an object is v1.
    if !json.trim_start().starts_with('{') {
        return Err(DeclaredError::Json("expected a JSON object".into()));
    }
    let raw: RawV1 = serde_json::from_str(json).map_err(|e| DeclaredError::Json(e.to_string()))?;
    let mut channels = Vec::with_capacity(raw.channels.len().min(MAX_ENTRIES));
    for c in raw.channels {
        let message = match c.message {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(v) => Some(v.to_string()),
        };
        channels.push(DeclaredMessage {
            channel: c.channel,
            message,
        });
    }
    let d = Declared {
        keys: raw.keys,
        tags: raw.tags,
        versions: raw.versions,
        patterns: raw.patterns,
        channels,
    };
    let n = d.entries();
    if n > MAX_ENTRIES {
        return Err(DeclaredError::TooManyEntries(n));
    }
    for (field, list) in [
        ("keys", &d.keys),
        ("tags", &d.tags),
        ("versions", &d.versions),
        ("patterns", &d.patterns),
    ] {
        check_entries(field, list.iter().map(String::as_str))?;
    }
    check_entries("channels", d.channels.iter().map(|c| c.channel.as_str()))?;
    for m in d.channels.iter().filter_map(|c| c.message.as_deref()) {
        if m.len() > MAX_ENTRY_BYTES {
            return Err(DeclaredError::BadEntry {
                field: "channels",
                len: m.len(),
            });
        }
    }
    Ok(d)
}

fn check_entries<'a>(
    field: &'static str,
    entries: impl Iterator<Item = &'a str>,
) -> Result<(), DeclaredError> {
    for e in entries {
        if e.is_empty() || e.len() > MAX_ENTRY_BYTES {
            return Err(DeclaredError::BadEntry {
                field,
                len: e.len(),
            });
        }
    }
    Ok(())
}

/// Serializes a declaration as the SQL function does (for tests, fixtures and
/// tools that emit the message themselves).
pub fn to_content(d: &Declared) -> String {
    let channels: Vec<serde_json::Value> = d
        .channels
        .iter()
        .map(|c| {
            let mut o = serde_json::Map::new();
            o.insert("channel".into(), c.channel.clone().into());
            if let Some(m) = &c.message {
                o.insert("message".into(), m.clone().into());
            }
            serde_json::Value::Object(o)
        })
        .collect();
    let body = serde_json::json!({
        "keys": d.keys,
        "tags": d.tags,
        "versions": d.versions,
        "patterns": d.patterns,
        "channels": channels,
    });
    format!("{INVALIDATE_PREFIX}{VERSION}:{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Declared, DeclaredError> {
        let rest = s
            .strip_prefix(INVALIDATE_PREFIX)
            .expect("tests pass whole contents");
        parse_invalidate(rest.as_bytes())
    }

    #[test]
    fn a_full_payload() {
        let d = parse(
            r#"invalidate:v1:{"keys":["a","b"],"tags":["user:1"],"versions":["post:7"],"patterns":["feed:*"],"channels":[{"channel":"c","message":{"id":7}},{"channel":"d","message":"plain"},{"channel":"e"}]}"#,
        )
        .unwrap();
        assert_eq!(d.keys, ["a", "b"]);
        assert_eq!(d.tags, ["user:1"]);
        assert_eq!(d.versions, ["post:7"]);
        assert_eq!(d.patterns, ["feed:*"]);
        assert_eq!(d.channels[0].message.as_deref(), Some(r#"{"id":7}"#));
        assert_eq!(d.channels[1].message.as_deref(), Some("plain"));
        assert_eq!(d.channels[2].message, None);
        assert_eq!(d.entries(), 8);
    }

    #[test]
    fn absent_fields_are_empty() {
        let d = parse(r#"invalidate:v1:{"keys":["k"]}"#).unwrap();
        assert_eq!(d.keys, ["k"]);
        assert!(d.tags.is_empty() && d.channels.is_empty());
        assert_eq!(parse("invalidate:v1:{}").unwrap(), Declared::default());
    }

    #[test]
    fn what_is_malformed() {
        let cases: &[(&str, &str)] = &[
            ("invalidate:v2:{}", "unknown payload version \"v2\""),
            ("invalidate:", "unknown payload version \"\""),
            ("invalidate:v1", "invalid payload"),
            ("invalidate:v1:{", "invalid payload"),
            ("invalidate:v1:[]", "invalid payload"),
            (r#"invalidate:v1:[["a"]]"#, "expected a JSON object"),
            (r#"invalidate:v1:{"kyes":["a"]}"#, "unknown field `kyes`"),
            (r#"invalidate:v1:{"keys":"a"}"#, "invalid payload"),
            (r#"invalidate:v1:{"keys":[1]}"#, "invalid payload"),
            (r#"invalidate:v1:{"keys":[null]}"#, "invalid payload"),
            (
                r#"invalidate:v1:{"keys":[""]}"#,
                "an entry of keys is 0 bytes",
            ),
            (
                r#"invalidate:v1:{"channels":[{"message":"m"}]}"#,
                "missing field `channel`",
            ),
            (
                r#"invalidate:v1:{"channels":[{"channel":""}]}"#,
                "an entry of channels is 0 bytes",
            ),
        ];
        for (content, want) in cases {
            let e = parse(content).expect_err(content).to_string();
            assert!(e.contains(want), "{content}: {e}");
        }
        assert_eq!(
            parse_invalidate(b"v1:\xff"),
            Err(DeclaredError::NotUtf8),
            "bytes that are not UTF-8"
        );
    }

    #[test]
    fn limits() {
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| i.to_string()).collect();
        let d = Declared {
            keys: many,
            ..Default::default()
        };
        assert_eq!(
            parse(&to_content(&d)),
            Err(DeclaredError::TooManyEntries(MAX_ENTRIES + 1))
        );
        let long = Declared {
            keys: vec!["k".repeat(MAX_ENTRY_BYTES + 1)],
            ..Default::default()
        };
        assert!(matches!(
            parse(&to_content(&long)),
            Err(DeclaredError::BadEntry { field: "keys", .. })
        ));
        let huge = format!("v1:{}", " ".repeat(MAX_PAYLOAD_BYTES));
        assert!(matches!(
            parse_invalidate(huge.as_bytes()),
            Err(DeclaredError::TooLarge(_))
        ));
        let at_limit = Declared {
            keys: vec!["k".repeat(MAX_ENTRY_BYTES)],
            ..Default::default()
        };
        assert_eq!(parse(&to_content(&at_limit)), Ok(at_limit));
    }

    fn entry() -> impl Strategy<Value = String> {
        "[a-z0-9:*?\\[\\]\\\\\"{}é]{1,12}"
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_invalidate(&bytes);
            let mut v1 = b"v1:".to_vec();
            v1.extend_from_slice(&bytes);
            let _ = parse_invalidate(&v1);
        }

        #[test]
        fn never_panics_on_json_like_text(s in "v1:\\{(\"(keys|tags|channels|channel|message)\"|[\\[\\]{}:,0-9\"a-z]|null|true){0,40}") {
            let _ = parse_invalidate(s.as_bytes());
        }

        #[test]
        fn what_to_content_writes_parses_back(
            keys in proptest::collection::vec(entry(), 0..5),
            tags in proptest::collection::vec(entry(), 0..5),
            versions in proptest::collection::vec(entry(), 0..3),
            patterns in proptest::collection::vec(entry(), 0..3),
            channels in proptest::collection::vec((entry(), proptest::option::of(entry())), 0..3),
        ) {
            let d = Declared {
                keys, tags, versions, patterns,
                channels: channels.into_iter().map(|(channel, message)| DeclaredMessage { channel, message }).collect(),
            };
            prop_assert_eq!(parse(&to_content(&d)), Ok(d));
        }
    }
}
