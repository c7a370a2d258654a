//! Names of the structured fields of our `tracing` events, defined once.
//!
//! Log lines are read by people and by log pipelines (`--log-format json`
//! turns each field into a JSON key), so one concept has one name everywhere:
//! a dashboard that filters on `lsn` must find every line about an LSN.
//! Use the constants with tracing's constant-name syntax:
//!
//! ```
//! use cache_invalidator::log_fields::{ERROR, LSN, TABLE};
//! # let (err, lsn, table) = ("boom", "0/16B3748", "public.users");
//! tracing::warn!({ ERROR } = %err, { LSN } = %lsn, { TABLE } = %table, "fallback fired");
//! ```
//!
//! Rules (STYLE.md habit 10): never log row values or secrets. Rendered keys,
//! tags and channel payloads contain row values (`user:42:profile`), so they
//! are not fields; log the table, the rule and the count instead. URLs are
//! logged only masked (`sink::error::mask_url`). Durations are fields in
//! milliseconds (`*_ms`), sizes in bytes (`*_bytes`), LSNs in PostgreSQL's
//! `X/Y` form via `Display`.

/// An LSN the event is about (a Commit's `end_lsn`, a marker's position), `X/Y`.
pub const LSN: &str = "lsn";
/// The LSN confirmed (flushed) to PostgreSQL, `X/Y`.
pub const CONFIRMED_LSN: &str = "confirmed_lsn";
/// The server's WAL end from the last keepalive or XLogData, `X/Y`.
pub const WAL_END: &str = "wal_end";
/// A transaction id (`xid`).
pub const XID: &str = "xid";
/// A table, `schema.table` as in the catalog.
pub const TABLE: &str = "table";
/// A relation OID.
pub const RELATION_ID: &str = "relation_id";
/// A column name (never its value).
pub const COLUMN: &str = "column";
/// A row operation: `insert`, `update`, `delete`, `truncate`.
pub const OP: &str = "op";
/// The replication slot name.
pub const SLOT: &str = "slot";
/// The publication name.
pub const PUBLICATION: &str = "publication";
/// A backend PID (the slot's active PID, a blocking transaction).
pub const PID: &str = "pid";
/// The error, formatted with `%` (its `Display`, causes included where the error prints them).
pub const ERROR: &str = "error";
/// A stable short error class, the same as the metric label (`connection`, `noperm`, ...).
pub const ERROR_KIND: &str = "error_kind";
/// Why something happened (a fallback reason, a flush reason), a stable name.
pub const REASON: &str = "reason";
/// The other end: `postgres` or `redis`.
pub const TARGET: &str = "target";
/// A masked URL or `host:port` of the other end.
pub const ADDR: &str = "addr";
/// Retry attempt number, from 1.
pub const ATTEMPT: &str = "attempt";
/// The backoff before the next attempt, milliseconds.
pub const BACKOFF_MS: &str = "backoff_ms";
/// Redis operations in a batch.
pub const BATCH_OPS: &str = "batch_ops";
/// Transactions in a batch or a progress interval.
pub const TXNS: &str = "txns";
/// Transactions per second over the last progress interval.
pub const TXNS_PER_SEC: &str = "txns_per_sec";
/// Row changes in a batch or a progress interval.
pub const CHANGES: &str = "changes";
/// Replication lag behind the server's WAL end, bytes.
pub const LAG_BYTES: &str = "lag_bytes";
/// Heartbeat round trip through the stream, milliseconds.
pub const HEARTBEAT_LAG_MS: &str = "heartbeat_lag_ms";
/// Commit-to-applied latency, milliseconds.
pub const LATENCY_MS: &str = "latency_ms";
/// An elapsed time, milliseconds (blocked for, took).
pub const ELAPSED_MS: &str = "elapsed_ms";
/// `active` or `standby`.
pub const ROLE: &str = "role";
/// A mapping or config file path.
pub const FILE: &str = "file";
/// A mapping rule's index within its table's rules, from 0.
pub const RULE: &str = "rule";
/// How many (keys unlinked, changes fallen back, ...), with the message saying what.
pub const COUNT: &str = "count";
/// A listen address (the metrics endpoint).
pub const LISTEN: &str = "listen";

/// Every field name, for tests and for documentation generators.
pub const ALL: &[&str] = &[
    LSN,
    CONFIRMED_LSN,
    WAL_END,
    XID,
    TABLE,
    RELATION_ID,
    COLUMN,
    OP,
    SLOT,
    PUBLICATION,
    PID,
    ERROR,
    ERROR_KIND,
    REASON,
    TARGET,
    ADDR,
    ATTEMPT,
    BACKOFF_MS,
    BATCH_OPS,
    TXNS,
    TXNS_PER_SEC,
    CHANGES,
    LAG_BYTES,
    HEARTBEAT_LAG_MS,
    LATENCY_MS,
    ELAPSED_MS,
    ROLE,
    FILE,
    RULE,
    COUNT,
    LISTEN,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for n in ALL {
            assert!(seen.insert(n), "duplicate field name {n}");
            assert!(
                !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{n} is not snake_case"
            );
        }
    }
}
