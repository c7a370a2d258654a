//! The record format and offline replay: run the mappings over recorded
//! transactions and get the plan of each, as `cache-invalidator replay` prints it.
//!
//! One JSON object per line and committed transaction:
//! `{"xid":735,"lsn":"0/1A2B3C4","commit_time":"...","changes":[{"table":"public.users","op":"update","old":{"id":"1"},"new":{"id":"1","name":"Ann"}}]}`.
//! Values are text or `null` (numbers are accepted as their text); a column
//! absent from `old`/`new` is unknown (not NULL). `"types":{"id":"int8"}` on a
//! change types its columns for `refresh` values (JSON numbers, booleans,
//! embedded json); `record` writes it. A truncate is
//! `{"table":"public.users","op":"truncate"}`; a logical decoding message is
//! `{"op":"message","prefix":"cache-invalidator","content":"flush:all"}`.
//! Field order is not significant; unknown fields are ignored.
//!
//! Recorded files carry no Relation metadata, so relations are built by column
//! name: every column the table's rules read, plus every column seen.
//!
//! ```
//! use std::sync::Arc;
//! use cache_invalidator::map::Mappings;
//! use cache_invalidator::plan::PlannerContext;
//! use cache_invalidator::replay::replay_str;
//!
//! let mappings = Mappings::parse("users.toml", r#"
//!     [[table]]
//!     name = "users"
//!     keys = ["user:{id}:profile"]
//!     tags = ["user:{id}"]
//! "#)?;
//! let recorded = r#"{"xid":7,"lsn":"0/16B3748","changes":[
//!     {"table":"public.users","op":"update","old":{"id":"1"},"new":{"id":"2","name":"Ann"}}]}"#;
//! let recorded = recorded.replace('\n', "");
//! let plans = replay_str(Arc::new(mappings), PlannerContext::default(), &recorded)?;
//! assert_eq!(plans[0].keys, ["user:1:profile", "user:2:profile"]);
//! assert_eq!(plans[0].tags, ["tag:user:1", "tag:user:2"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::decode::{Change, Op, Relation, RelationColumn, Row, Value};
use crate::lsn::Lsn;
use crate::map::{Mappings, TableName};
use crate::plan::{Plan, Planner, PlannerContext};

/// One recorded committed transaction.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RecordedTxn {
    /// Transaction id.
    pub xid: u32,
    /// Commit LSN.
    pub lsn: Lsn,
    /// Commit time (RFC 3339), informative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
    /// The changes in order.
    #[serde(default)]
    pub changes: Vec<RecordedChange>,
}

/// What a recorded change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordedOp {
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// TRUNCATE.
    Truncate,
    /// A logical decoding message.
    Message,
}

/// One recorded change or message.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RecordedChange {
    /// The operation.
    pub op: RecordedOp,
    /// `schema.table` (or `table`); absent for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Old image: column -> text or null; absent columns are unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<BTreeMap<String, RecordedValue>>,
    /// New image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<BTreeMap<String, RecordedValue>>,
    /// Message prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Message content (UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Column types by name (`int4`, `numeric`, `bool`, `jsonb`, ...), for
    /// `refresh` values: `record` writes one for every column it writes whose
    /// type renders other than as text. A column the change carries without
    /// a type is text; a change without `types` keeps the types known so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<BTreeMap<String, String>>,
}

/// A recorded value: text or null (numbers accepted as text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RecordedValue(pub Option<String>);

impl<'de> Deserialize<'de> for RecordedValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(RecordedValue(None)),
            serde_json::Value::String(s) => Ok(RecordedValue(Some(s))),
            serde_json::Value::Number(n) => Ok(RecordedValue(Some(n.to_string()))),
            other => Err(serde::de::Error::custom(format!(
                "invalid value {other}: values are text as PostgreSQL prints it (e.g. \"t\" for true) or null"
            ))),
        }
    }
}

/// A line of a recorded file that is not a valid transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct BadLine {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses one line of the record format.
pub fn parse_line(text: &str) -> Result<RecordedTxn, String> {
    let txn: RecordedTxn = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for (i, c) in txn.changes.iter().enumerate() {
        let at = |m: &str| format!("change {}: {m}", i + 1);
        match c.op {
            RecordedOp::Message => {
                if c.prefix.is_none() || c.content.is_none() {
                    return Err(at("a message needs \"prefix\" and \"content\""));
                }
            }
            op => {
                let Some(t) = &c.table else {
                    return Err(at("missing \"table\""));
                };
                TableName::parse(t).map_err(|e| at(&e))?;
                let ok = match op {
                    RecordedOp::Insert => c.new.is_some(),
                    RecordedOp::Update => c.new.is_some(),
                    RecordedOp::Delete => c.old.is_some(),
                    _ => true,
                };
                if !ok {
                    return Err(at(match op {
                        RecordedOp::Delete => "a delete needs \"old\"",
                        _ => "an insert or update needs \"new\"",
                    }));
                }
            }
        }
    }
    Ok(txn)
}

/// Parses a whole recorded file. Blank lines are skipped. With `skip_bad`,
/// malformed lines are returned apart instead of failing.
pub fn parse_file(text: &str, skip_bad: bool) -> Result<(Vec<RecordedTxn>, Vec<BadLine>), BadLine> {
    let mut txns = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(t) => txns.push(t),
            Err(message) => {
                let b = BadLine {
                    line: i + 1,
                    message,
                };
                if skip_bad {
                    bad.push(b);
                } else {
                    return Err(b);
                }
            }
        }
    }
    Ok((txns, bad))
}

/// One pub/sub message of a [`TxnPlan`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublishJson {
    /// Channel.
    pub channel: String,
    /// The message, parsed back into JSON.
    pub message: serde_json::Value,
}

/// The plan of one transaction, lists sorted and deduplicated: what `replay` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TxnPlan {
    /// Commit LSN.
    pub lsn: Lsn,
    /// Transaction id.
    pub xid: u32,
    /// Keys to UNLINK.
    pub keys: Vec<String>,
    /// Tag set keys.
    pub tags: Vec<String>,
    /// Version keys to bump.
    pub versions: Vec<String>,
    /// Key patterns.
    pub patterns: Vec<String>,
    /// Tag set key patterns.
    pub tag_patterns: Vec<String>,
    /// Version key patterns.
    pub version_patterns: Vec<String>,
    /// Keys that get a tombstone at `lsn` (`mode = "tombstone"` rules); omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tombstones: Vec<String>,
    /// Tag set keys whose members get a tombstone at `lsn`; omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tombstone_tags: Vec<String>,
    /// Keys set to the new row (`refresh` rules), by key; omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refresh: Vec<RefreshJson>,
    /// Messages, in first-seen order.
    pub publish: Vec<PublishJson>,
}

/// One refreshed key of a [`TxnPlan`]: the value exactly as it is set.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshJson {
    /// The key.
    pub key: String,
    /// `json` or `hash`.
    pub format: &'static str,
    /// The TTL in seconds, when the rule sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    /// The JSON value (`_lsn` first), or the hash's fields as a JSON object
    /// in field order.
    pub value: Box<serde_json::value::RawValue>,
}

impl PartialEq for RefreshJson {
    fn eq(&self, other: &Self) -> bool {
        (&self.key, self.format, self.ttl_s, self.value.get())
            == (&other.key, other.format, other.ttl_s, other.value.get())
    }
}

impl RefreshJson {
    fn new(key: String, set: crate::plan::RefreshSet) -> RefreshJson {
        use crate::plan::RefreshValue;
        let (format, text) = match set.value {
            RefreshValue::Json(text) => (crate::map::RefreshFormat::Json, text),
            RefreshValue::Hash(fields) => {
                let mut text = String::from("{");
                for (i, (field, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        text.push(',');
                    }
                    crate::plan::refresh::push_json_str(&mut text, field);
                    text.push(':');
                    crate::plan::refresh::push_json_str(&mut text, value);
                }
                text.push('}');
                (crate::map::RefreshFormat::Hash, text)
            }
        };
        let value = serde_json::value::RawValue::from_string(text).unwrap_or_else(|e| {
            serde_json::value::to_raw_value(&format!("unprintable value: {e}")).unwrap_or_default()
        });
        RefreshJson {
            key,
            format: format.as_str(),
            ttl_s: set.ttl_s,
            value,
        }
    }
}

fn sorted(set: crate::plan::KeySet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(str::to_owned).collect();
    v.sort_unstable();
    v
}

impl TxnPlan {
    /// Sorts a [`Plan`] into its printed form.
    pub fn from_plan(xid: u32, lsn: Lsn, plan: Plan) -> TxnPlan {
        TxnPlan {
            lsn,
            xid,
            keys: sorted(plan.keys),
            tags: sorted(plan.tags),
            versions: sorted(plan.versions),
            patterns: sorted(plan.patterns),
            tag_patterns: sorted(plan.tag_patterns),
            version_patterns: sorted(plan.version_patterns),
            tombstones: sorted(plan.tombstones.into_keys().collect()),
            tombstone_tags: sorted(plan.tombstone_tags.into_keys().collect()),
            refresh: {
                let mut v: Vec<RefreshJson> = plan
                    .refresh
                    .into_iter()
                    .map(|(k, set)| RefreshJson::new(k, set))
                    .collect();
                v.sort_unstable_by(|a, b| a.key.cmp(&b.key));
                v
            },
            publish: plan
                .publish
                .into_iter()
                .map(|p| PublishJson {
                    message: serde_json::from_str(&p.message)
                        .unwrap_or(serde_json::Value::String(p.message)),
                    channel: p.channel,
                })
                .collect(),
        }
    }
}

/// Runs recorded transactions through a [`Planner`], building name-based relations.
pub struct Replayer {
    planner: Planner,
    /// Per table: the relation built so far and its columns.
    relations: HashMap<TableName, (Arc<Relation>, Vec<NamedColumn>)>,
    next_oid: u32,
}

impl Replayer {
    /// A replayer over `mappings`.
    pub fn new(mappings: Arc<Mappings>, ctx: PlannerContext) -> Replayer {
        Replayer {
            planner: Planner::new(mappings, ctx),
            relations: HashMap::new(),
            next_oid: 1,
        }
    }

    /// The planner (for its stats and fallbacks).
    pub fn planner(&mut self) -> &mut Planner {
        &mut self.planner
    }

    /// Plans one transaction.
    pub fn transaction(&mut self, txn: &RecordedTxn) -> Plan {
        self.planner.begin(txn.xid, txn.lsn);
        for c in &txn.changes {
            if c.op == RecordedOp::Message {
                if let (Some(p), Some(content)) = (&c.prefix, &c.content) {
                    self.planner.message(p, content.as_bytes(), txn.lsn);
                }
                continue;
            }
            let Some(table) = c.table.as_deref().and_then(|t| TableName::parse(t).ok()) else {
                continue;
            };
            let change = self.change(&table, c);
            self.planner.change(&change);
        }
        self.planner.commit();
        self.planner.take()
    }

    fn change(&mut self, table: &TableName, c: &RecordedChange) -> Change {
        let mappings = self.planner.mappings();
        let entry = self.relations.entry(table.clone()).or_insert_with(|| {
            let mut columns: Vec<NamedColumn> = Vec::new();
            for r in mappings.rules_for(table) {
                for col in r
                    .columns
                    .iter()
                    .chain(r.changed_columns.iter().flatten())
                    .chain(&r.assume_unchanged)
                {
                    if !columns.iter().any(|(c, _)| c == col) {
                        columns.push((col.clone(), TEXT_OID));
                    }
                }
            }
            let oid = self.next_oid;
            self.next_oid += 1;
            (make_relation(oid, table, &columns), columns)
        });
        // Every column seen joins the relation; a change with `types` types
        // the columns it carries (one it carries without a type is text), a
        // change without keeps the types known so far.
        let mut changed = false;
        for name in c.old.iter().chain(&c.new).flat_map(|m| m.keys()) {
            let oid = match &c.types {
                Some(types) => types
                    .get(name)
                    .and_then(|t| crate::plan::refresh::type_oid_by_name(t))
                    .unwrap_or(TEXT_OID),
                None => TEXT_OID,
            };
            match entry.1.iter_mut().find(|(col, _)| col == name) {
                Some((_, known)) if c.types.is_some() && *known != oid => {
                    *known = oid;
                    changed = true;
                }
                Some(_) => {}
                None => {
                    entry.1.push((name.clone(), oid));
                    changed = true;
                }
            }
        }
        if changed {
            entry.0 = make_relation(entry.0.oid, table, &entry.1);
        }
        let row = |m: &BTreeMap<String, RecordedValue>| Row {
            values: entry
                .1
                .iter()
                .map(|(col, _)| match m.get(col) {
                    None => Value::Unknown,
                    Some(RecordedValue(None)) => Value::Null,
                    Some(RecordedValue(Some(s))) => Value::Text(s.as_str().into()),
                })
                .collect(),
        };
        Change {
            relation: Arc::clone(&entry.0),
            op: match c.op {
                RecordedOp::Insert => Op::Insert,
                RecordedOp::Update => Op::Update,
                RecordedOp::Delete => Op::Delete,
                _ => Op::Truncate,
            },
            old: c.old.as_ref().map(row),
            new: c.new.as_ref().map(row),
        }
    }
}

/// `text`: a column's type until a recorded `types` says otherwise.
const TEXT_OID: u32 = 25;

/// A recorded column: its name and type OID.
type NamedColumn = (String, u32);

/// A relation by column names, REPLICA IDENTITY FULL (a recorded old row is
/// whatever was recorded; an absent one means the values did not change).
fn make_relation(oid: u32, table: &TableName, cols: &[NamedColumn]) -> Arc<Relation> {
    Arc::new(Relation {
        oid,
        schema: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: b'f',
        columns: cols
            .iter()
            .map(|(name, type_oid)| RelationColumn {
                name: name.clone(),
                is_key: true,
                type_oid: *type_oid,
                type_modifier: -1,
            })
            .collect(),
    })
}

/// Replays a recorded file's text: one plan per transaction. Fails on the
/// first malformed line, before planning anything.
pub fn replay_str(
    mappings: Arc<Mappings>,
    ctx: PlannerContext,
    text: &str,
) -> Result<Vec<TxnPlan>, BadLine> {
    let (txns, _) = parse_file(text, false)?;
    let mut r = Replayer::new(mappings, ctx);
    Ok(txns
        .iter()
        .map(|t| TxnPlan::from_plan(t.xid, t.lsn, r.transaction(t)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_line() {
        let e = parse_file("\n{\"xid\":1,\"lsn\":\"0/1\"}\nnot json\n", false).unwrap_err();
        assert_eq!(e.line, 3);
        let e = parse_line(r#"{"xid":1,"lsn":"0/1","changes":[{"table":"t","op":"delete"}]}"#)
            .unwrap_err();
        assert_eq!(e, "change 1: a delete needs \"old\"");
        let e = parse_line(
            r#"{"xid":1,"lsn":"0/1","changes":[{"table":"t","op":"insert","new":{"a":true}}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("values are text as PostgreSQL prints it"), "{e}");
        let e = parse_line(r#"{"xid":1,"lsn":"zz","changes":[]}"#).unwrap_err();
        assert!(e.contains("invalid LSN"), "{e}");
        let (ok, bad) = parse_file("x\n{\"xid\":1,\"lsn\":\"0/1\"}\n", true).unwrap();
        assert_eq!((ok.len(), bad.len(), bad[0].line), (1, 1, 1));
    }

    #[test]
    fn absent_columns_are_unknown_and_numbers_are_text() {
        let m = Arc::new(
            Mappings::parse(
                "m.toml",
                "[[table]]\nname = \"posts\"\nkeys = [\"post:{id}\", \"author:{author_id}\"]\n",
            )
            .unwrap(),
        );
        let text = r#"{"xid":1,"lsn":"0/1","changes":[{"table":"posts","op":"insert","new":{"id":7,"author_id":null}},{"table":"posts","op":"delete","old":{"id":"8"}}]}"#;
        let plans = replay_str(m, PlannerContext::default(), text).unwrap();
        // post 7: author NULL renders nothing; post 8's delete lacks author_id: fallback.
        assert_eq!(plans[0].keys, ["post:7"]);
        assert_eq!(plans[0].patterns, ["author:*", "post:*"]);
    }

    #[test]
    fn recorded_types_render_refreshed_values_typed_and_carry_over() {
        let m = Arc::new(
            Mappings::parse(
                "m.toml",
                "[[table]]\nname = \"p\"\nrefresh = [{ key = \"p:{id}\", columns = [\"id\", \"n\", \"ok\"] }]\n",
            )
            .unwrap(),
        );
        let value = |text: &str| {
            let plans = replay_str(Arc::clone(&m), PlannerContext::default(), text).unwrap();
            plans
                .iter()
                .map(|p| {
                    let v: serde_json::Value =
                        serde_json::from_str(p.refresh[0].value.get()).unwrap();
                    serde_json::json!([v["id"], v["n"], v["ok"]])
                })
                .collect::<Vec<_>>()
        };
        // Typed, then a change without `types` keeps them, then a typed change
        // that carries `n` without a type makes it text.
        let typed = r#"{"xid":1,"lsn":"0/1","changes":[{"table":"p","op":"insert","types":{"id":"int4","n":"numeric","ok":"bool"},"new":{"id":"1","n":"1.50","ok":"t"}}]}
{"xid":2,"lsn":"0/2","changes":[{"table":"p","op":"update","new":{"id":"1","n":"2","ok":"f"}}]}
{"xid":3,"lsn":"0/3","changes":[{"table":"p","op":"update","types":{"id":"int4","ok":"bool"},"new":{"id":"1","n":"x","ok":"f"}}]}"#;
        let got = value(typed);
        assert_eq!(got[0], serde_json::json!([1, 1.5, true]));
        assert_eq!(got[1], serde_json::json!([1, 2, false]));
        assert_eq!(got[2], serde_json::json!([1, "x", false]));
        // Without `types`, every value is text.
        let untyped = typed.lines().nth(1).unwrap();
        assert_eq!(value(untyped)[0], serde_json::json!(["1", "2", "f"]));
    }
}
