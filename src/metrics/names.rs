//! Metric names, each defined once. Counters carry their `_total` suffix as
//! exposed (the OpenMetrics encoder adds it; registration strips it).
//! `docs/metrics.md` and `deploy/prometheus-alerts.yml` use the same names.

/// Gauge: bytes between the server's WAL end (last keepalive or XLogData)
/// and the confirmed (flushed) LSN.
pub const REPLICATION_LAG_BYTES: &str = "cache_invalidator_replication_lag_bytes";
/// Gauge: the last LSN confirmed to PostgreSQL, as a number.
pub const CONFIRMED_LSN: &str = "cache_invalidator_confirmed_lsn";
/// Counter: committed transactions whose invalidations were applied.
pub const TRANSACTIONS_TOTAL: &str = "cache_invalidator_transactions_total";
/// Counter `{table, op}`: row changes seen for mapped tables.
pub const CHANGES_TOTAL: &str = "cache_invalidator_changes_total";
/// Counter `{kind}`: Redis invalidations sent (keys, tags, versions, patterns, publish).
pub const INVALIDATIONS_TOTAL: &str = "cache_invalidator_invalidations_total";
/// Counter `{outcome}`: keys `refresh` rules wanted to set, by what became of
/// them (`set`, `kept`, `unlinked_fallback`, `too_large`).
pub const REFRESHES_TOTAL: &str = "cache_invalidator_refreshes_total";
/// Counter `{table, reason}`: changes that fired the table's truncate invalidations instead.
pub const FALLBACKS_TOTAL: &str = "cache_invalidator_fallbacks_total";
/// Counter `{reason}`: whole-table or whole-cache flushes fired by the worker.
pub const FLUSHES_TOTAL: &str = "cache_invalidator_flushes_total";
/// Counter `{kind}`: Redis errors (connection, timeout, noperm, oom, ...).
pub const REDIS_ERRORS_TOTAL: &str = "cache_invalidator_redis_errors_total";
/// Gauge: seconds acknowledgement has been blocked by a permanent Redis error; 0 when not.
pub const BLOCKED_SECONDS: &str = "cache_invalidator_blocked_seconds";
/// Counter `{target}`: reconnections to `postgres` or `redis`.
pub const RECONNECTS_TOTAL: &str = "cache_invalidator_reconnects_total";
/// Histogram: Redis operations per applied batch.
pub const BATCH_SIZE: &str = "cache_invalidator_batch_size";
/// Histogram: seconds from a transaction's commit time to its invalidations applied in Redis.
pub const APPLY_LATENCY_SECONDS: &str = "cache_invalidator_apply_latency_seconds";
/// Gauge: seconds the last heartbeat message took to come back through the stream.
pub const HEARTBEAT_LAG_SECONDS: &str = "cache_invalidator_heartbeat_lag_seconds";
/// Gauge `{role}`: 1 for the current role (`active` or `standby`), 0 for the other.
pub const ROLE: &str = "cache_invalidator_role";
/// Gauge: mapped tables currently followed under a new name (renamed since start).
pub const RENAMED_TABLES: &str = "cache_invalidator_renamed_tables";
/// Counter `{source, kind}`: invalidations requested other than by a
/// mapping rule (`source="declared"`: the SQL API's messages), by kind.
pub const REQUESTED_INVALIDATIONS_TOTAL: &str = "cache_invalidator_requested_invalidations_total";
/// Histogram: seconds a batch waited for its transactions to be visible on
/// the primary (batches whose check needed a query).
pub const VISIBILITY_WAIT_SECONDS: &str = "cache_invalidator_visibility_wait_seconds";
/// Gauge: 1 while a batch waits for visibility on the primary, else 0.
pub const VISIBILITY_WAITING: &str = "cache_invalidator_visibility_waiting";
/// Gauge `{replica}`: 1 while a listed read replica is reachable and in recovery.
pub const REPLICA_UP: &str = "cache_invalidator_replica_up";
/// Gauge `{replica}`: bytes between the primary's WAL end and the replica's replay position.
pub const REPLICA_LAG_BYTES: &str = "cache_invalidator_replica_replay_lag_bytes";
/// Gauge `{replica}`: seconds since the replica's last replayed transaction
/// while it has received WAL it has not replayed; 0 when caught up.
pub const REPLICA_LAG_SECONDS: &str = "cache_invalidator_replica_replay_lag_seconds";
/// Counter `{replica}`: batches that waited for the replica to replay them.
pub const REPLICA_WAITS_TOTAL: &str = "cache_invalidator_replica_waits_total";
/// Counter `{replica}`: batches applied before the replica replayed them
/// (`replica_max_wait_ms` elapsed, or it was still behind an earlier timeout).
pub const REPLICA_TIMEOUTS_TOTAL: &str = "cache_invalidator_replica_timeouts_total";
/// Counter `{replica}`: re-applications (of merged queued batches) once the
/// replica replayed what was applied ahead of it (timed out, or while down).
pub const REPLICA_REAPPLIES_TOTAL: &str = "cache_invalidator_replica_reapplies_total";
/// Gauge `{reason}`: mapped tables in fallback because their mapping no
/// longer fits the schema (`missing_table`, `missing_column`; found at start
/// or at run time), invalidated by their truncate invalidations.
pub const BROKEN_TABLES: &str = "cache_invalidator_broken_tables";
/// Gauge: 1 while the publication hides changes the mappings need (drift), else 0.
pub const PUBLICATION_DRIFT: &str = "cache_invalidator_publication_drift";
/// Counter: times publication drift was detected (each new set of problems).
pub const PUBLICATION_DRIFTS_TOTAL: &str = "cache_invalidator_publication_drifts_total";
