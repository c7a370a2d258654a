//! The decoded model handed downstream: an ordered stream of [`Event`]s.
//!
//! pgoutput without streaming sends a transaction only after its commit, so a
//! consumer may act on each change as it arrives; it must hold nothing per
//! transaction beyond what it folds the change into.

use std::sync::Arc;

pub use bytestring::ByteString;

use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's epoch), as pgoutput sends times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp(pub i64);

/// Seconds between the Unix epoch and PostgreSQL's epoch.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

impl Timestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECONDS * 1_000_000)
    }

    /// The timestamp for a moment given in microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> Self {
        Timestamp(micros.saturating_sub(PG_EPOCH_UNIX_SECONDS * 1_000_000))
    }

    /// The current time.
    pub fn now() -> Self {
        Self::from_unix_micros(chrono::Utc::now().timestamp_micros())
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-25T20:00:00.123456Z`.
    pub fn to_rfc3339(self) -> String {
        match chrono::DateTime::from_timestamp_micros(self.unix_micros()) {
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            None => format!("@{}us", self.0),
        }
    }

    /// Parses what [`Timestamp::to_rfc3339`] prints (any RFC 3339 time is accepted).
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
        Some(Self::from_unix_micros(t.timestamp_micros()))
    }
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// The value as PostgreSQL prints it in text form (under the pinned session
    /// settings); shares the replication message's buffer (no copy).
    Text(ByteString),
    /// Not sent: an unchanged TOAST value with no old row to fill it from, or a
    /// column outside the replica identity in a key-only ('K') old tuple.
    /// Never to be confused with NULL.
    Unknown,
}

impl Value {
    /// The text, if known and not NULL.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s.as_ref()),
            _ => None,
        }
    }
}

/// A row image: one [`Value`] per column of its [`Relation`], in column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Values in the relation's column order.
    pub values: Vec<Value>,
}

impl Row {
    /// The value of a column by position.
    pub fn get(&self, index: usize) -> Option<&Value> {
        self.values.get(index)
    }
}

/// One column of a relation as the Relation message described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Column name, as in the catalog.
    pub name: String,
    /// Part of the replica identity (pgoutput's flag 1).
    pub is_key: bool,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (atttypmod).
    pub type_modifier: i32,
}

/// A published table as the last Relation message for its OID described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID (stable across renames).
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in order.
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// `schema.table`, the form mappings and logs use.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Position of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// INSERT (and COPY).
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// TRUNCATE of the whole table.
    Truncate,
}

impl Op {
    /// Lowercase name, as in mappings' `on` and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// One row change (or one table's truncate).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The relation the change is on.
    pub relation: Arc<Relation>,
    /// The operation.
    pub op: Op,
    /// Old image: DELETE always (identity columns, or all under REPLICA IDENTITY FULL);
    /// UPDATE only under FULL or when identity columns changed. Values outside the
    /// identity of a key-only image are [`Value::Unknown`].
    pub old: Option<Row>,
    /// New image: INSERT and UPDATE. Unchanged TOAST values are taken from `old`
    /// when it has them, otherwise [`Value::Unknown`].
    pub new: Option<Row>,
}

/// One decoded event, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A transaction starts.
    Begin {
        /// Transaction id.
        xid: u32,
        /// LSN of the commit record (pgoutput's "final LSN").
        final_lsn: Lsn,
        /// Commit time.
        commit_time: Timestamp,
    },
    /// A row change (or a truncate) inside the current transaction.
    Change(Change),
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Emitted inside a transaction (true) or immediately (false).
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// The prefix, e.g. `cache-invalidator`.
        prefix: String,
        /// The content bytes.
        content: Vec<u8>,
    },
    /// The transaction committed.
    Commit {
        /// Transaction id from the Begin.
        xid: u32,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the transaction: what is acknowledged once applied.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: Timestamp,
    },
    /// A Relation message arrived (schema seen for the first time or changed).
    Relation(Arc<Relation>),
}
