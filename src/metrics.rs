//! Prometheus metrics, readiness/liveness state and the HTTP endpoint that
//! serves them (`[metrics] listen`: `/metrics`, `/livez`, `/readyz`).
//!
//! Crate choice: [`prometheus_client`], the official Rust client of the
//! Prometheus project. It has no global registry (the worker owns one
//! [`Metrics`] value, tests build their own), label families keyed by typed
//! label sets, lock-free counters and gauges, and it writes the OpenMetrics
//! text format that Prometheus scrapes natively. The alternative (`metrics` +
//! `metrics-exporter-prometheus`) routes every call through a global recorder
//! and key strings, and pulls in an HTTP stack of its own that we would not use.
//!
//! The HTTP side is hyper 1 with hyper-util's Tokio glue: the smallest
//! well-kept server that parses HTTP for us; three fixed routes need no router.
//!
//! Every metric name is a constant below ([`names`]); `docs/metrics.md` and
//! `deploy/prometheus-alerts.yml` use the same names.
//!
//! Hot path: counters whose labels are a closed set (invalidation kinds, flush
//! reasons, reconnect targets, roles) are created up front and indexed by enum;
//! per-table counters are cached per table name, so a repeated `(table, op)`
//! costs one uncontended mutex and one atomic add, no allocation.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::decode::Op;

/// Metric names, each defined once. Counters carry their `_total` suffix as
/// exposed (the OpenMetrics encoder adds it; registration strips it).
pub mod names {
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
    /// Gauge: placeholder columns of mappings that their table no longer has
    /// (dropped or renamed by DDL); those tables fall back to their truncate invalidations.
    pub const MISSING_COLUMNS: &str = "cache_invalidator_missing_columns";
    /// Counter `{source, kind}`: invalidations requested other than by a
    /// mapping rule (`source="declared"`: the SQL API's messages), by kind.
    pub const REQUESTED_INVALIDATIONS_TOTAL: &str =
        "cache_invalidator_requested_invalidations_total";
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
    /// Gauge: mapped tables DDL broke (dropped, a column gone), invalidated by fallback.
    pub const BROKEN_TABLES: &str = "cache_invalidator_broken_tables";
    /// Gauge: 1 while the publication hides changes the mappings need (drift), else 0.
    pub const PUBLICATION_DRIFT: &str = "cache_invalidator_publication_drift";
    /// Counter: times publication drift was detected (each new set of problems).
    pub const PUBLICATION_DRIFTS_TOTAL: &str = "cache_invalidator_publication_drifts_total";
}

/// Buckets of [`names::VISIBILITY_WAIT_SECONDS`]: 0.1 ms to 30 s.
pub const VISIBILITY_WAIT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
];

/// Buckets of [`names::APPLY_LATENCY_SECONDS`]: 0.5 ms to 10 s.
pub const APPLY_LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of [`names::BATCH_SIZE`] (Redis operations per batch; `max_batch_ops` defaults to 10,000).
pub const BATCH_SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 10000.0,
];

/// The kinds of Redis invalidation, the `kind` label of [`names::INVALIDATIONS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidationKind {
    /// Keys unlinked (`keys = [...]`).
    Keys,
    /// Tag sets emptied (`tags = [...]`).
    Tags,
    /// Version keys bumped (`versions = [...]`).
    Versions,
    /// Patterns matched by a SCAN pass (`patterns = [...]`).
    Patterns,
    /// Messages published (`channels = [...]`).
    Publish,
    /// Keys set by `refresh` rules.
    Refresh,
    /// Refreshed keys left as they were: Redis held a newer version.
    RefreshKept,
}

impl InvalidationKind {
    /// Every kind, in label order.
    pub const ALL: [InvalidationKind; 7] = [
        InvalidationKind::Keys,
        InvalidationKind::Tags,
        InvalidationKind::Versions,
        InvalidationKind::Patterns,
        InvalidationKind::Publish,
        InvalidationKind::Refresh,
        InvalidationKind::RefreshKept,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidationKind::Keys => "keys",
            InvalidationKind::Tags => "tags",
            InvalidationKind::Versions => "versions",
            InvalidationKind::Patterns => "patterns",
            InvalidationKind::Publish => "publish",
            InvalidationKind::Refresh => "refresh",
            InvalidationKind::RefreshKept => "refresh_kept",
        }
    }
}

/// Why the worker fired truncate invalidations wholesale, the `reason` label of
/// [`names::FLUSHES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushReason {
    /// A `flush:all` marker came through the stream (slot created or recreated).
    MarkerAll,
    /// A `flush:table:<t>` marker came through the stream (table added to the publication).
    MarkerTable,
    /// Redis's or PostgreSQL's identity changed (Redis restored, replica promoted).
    IdentityChanged,
    /// A TRUNCATE of a mapped table.
    Truncate,
    /// A message under our prefix the worker could not understand (a malformed
    /// declared invalidation, an unknown payload version).
    MalformedMessage,
}

impl FlushReason {
    /// Every reason, in label order.
    pub const ALL: [FlushReason; 5] = [
        FlushReason::MarkerAll,
        FlushReason::MarkerTable,
        FlushReason::IdentityChanged,
        FlushReason::Truncate,
        FlushReason::MalformedMessage,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::MarkerAll => "marker_all",
            FlushReason::MarkerTable => "marker_table",
            FlushReason::IdentityChanged => "identity_changed",
            FlushReason::Truncate => "truncate",
            FlushReason::MalformedMessage => "malformed_message",
        }
    }
}

/// A connection the worker re-establishes, the `target` label of [`names::RECONNECTS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The replication (or SQL) connection to PostgreSQL.
    Postgres,
    /// The Redis connection.
    Redis,
}

impl Target {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Postgres => "postgres",
            Target::Redis => "redis",
        }
    }
}

/// Whether this process streams the slot (`active`) or waits for it (`standby`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Streams the slot.
    Active,
    /// Another worker holds the slot; this one retries until it can take over.
    Standby,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableOpLabels {
    table: String,
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableReasonLabels {
    table: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceKindLabels {
    source: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabels {
    target: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReplicaLabels {
    replica: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the
/// data consistent (a counter cache, a health field), so a panic elsewhere must
/// not take the metrics endpoint down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-table counter handles, looked up by `&str` without allocating.
struct TableCounters<K> {
    by_table: Mutex<HashMap<String, Vec<(K, Counter)>>>,
}

impl<K: Copy + Eq> TableCounters<K> {
    fn new() -> Self {
        TableCounters {
            by_table: Mutex::new(HashMap::new()),
        }
    }

    /// The cached counter of `(table, key)`, created by `make` on first use.
    fn get(&self, table: &str, key: K, make: impl FnOnce() -> Counter) -> Counter {
        let mut map = lock(&self.by_table);
        if let Some(list) = map.get_mut(table) {
            if let Some((_, c)) = list.iter().find(|(k, _)| *k == key) {
                return c.clone();
            }
            let c = make();
            list.push((key, c.clone()));
            return c;
        }
        let c = make();
        map.insert(table.to_owned(), vec![(key, c.clone())]);
        c
    }
}

/// The worker's metrics. Create once with [`Metrics::new`], share the `Arc`,
/// serve it with [`serve`].
pub struct Metrics {
    registry: Registry,
    replication_lag_bytes: Gauge<u64, AtomicU64>,
    confirmed_lsn: Gauge<u64, AtomicU64>,
    transactions: Counter,
    changes: Family<TableOpLabels, Counter>,
    change_cache: TableCounters<Op>,
    invalidations: [Counter; InvalidationKind::ALL.len()],
    fallbacks: Family<TableReasonLabels, Counter>,
    fallback_cache: TableCounters<&'static str>,
    flushes: [Counter; FlushReason::ALL.len()],
    redis_errors: Family<KindLabels, Counter>,
    blocked_seconds: Gauge<f64, AtomicU64>,
    blocked_since: Mutex<Option<Instant>>,
    reconnects: [Counter; 2],
    batch_size: Histogram,
    apply_latency: Histogram,
    heartbeat_lag: Gauge<f64, AtomicU64>,
    role: [Gauge; 2],
    renamed_tables: Gauge,
    missing_columns: Gauge,
    declared: [Counter; InvalidationKind::ALL.len()],
    visibility_wait: Histogram,
    visibility_waiting: Gauge,
    replica_up: Family<ReplicaLabels, Gauge>,
    replica_lag_bytes: Family<ReplicaLabels, Gauge<u64, AtomicU64>>,
    replica_lag_seconds: Family<ReplicaLabels, Gauge<f64, AtomicU64>>,
    replica_waits: Family<ReplicaLabels, Counter>,
    replica_timeouts: Family<ReplicaLabels, Counter>,
    replica_reapplies: Family<ReplicaLabels, Counter>,
    broken_tables: Gauge,
    publication_drift: Gauge,
    publication_drifts: Counter,
    /// The pattern lane's metrics.
    pub patterns: patterns::PatternMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registration name of a counter: the encoder appends `_total` itself.
fn counter_name(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Metrics {
    /// Registers every metric; label sets of closed label sets start at 0 so
    /// `rate()` and `increase()` see the first increment.
    pub fn new() -> Arc<Metrics> {
        use names::*;
        let mut r = Registry::default();

        let replication_lag_bytes = Gauge::<u64, AtomicU64>::default();
        r.register(
            REPLICATION_LAG_BYTES,
            "Bytes of WAL between the server's WAL end and the confirmed LSN",
            replication_lag_bytes.clone(),
        );
        let confirmed_lsn = Gauge::<u64, AtomicU64>::default();
        r.register(
            CONFIRMED_LSN,
            "Last LSN confirmed to PostgreSQL, as a number",
            confirmed_lsn.clone(),
        );
        let transactions = Counter::default();
        r.register(
            counter_name(TRANSACTIONS_TOTAL),
            "Committed transactions whose invalidations were applied",
            transactions.clone(),
        );
        let changes = Family::<TableOpLabels, Counter>::default();
        r.register(
            counter_name(CHANGES_TOTAL),
            "Row changes of mapped tables, by table and operation",
            changes.clone(),
        );

        let inv_family = Family::<KindLabels, Counter>::default();
        r.register(
            counter_name(INVALIDATIONS_TOTAL),
            "Redis invalidations sent, by kind (keys, tags, versions, patterns, publish)",
            inv_family.clone(),
        );
        let invalidations = InvalidationKind::ALL
            .map(|k| inv_family.get_or_create_owned(&KindLabels { kind: k.as_str() }));

        let fallbacks = Family::<TableReasonLabels, Counter>::default();
        r.register(
            counter_name(FALLBACKS_TOTAL),
            "Changes that fired their table's truncate invalidations instead of their own, by table and reason",
            fallbacks.clone(),
        );

        let flush_family = Family::<ReasonLabels, Counter>::default();
        r.register(
            counter_name(FLUSHES_TOTAL),
            "Whole-table or whole-cache flushes, by reason",
            flush_family.clone(),
        );
        let flushes = FlushReason::ALL
            .map(|f| flush_family.get_or_create_owned(&ReasonLabels { reason: f.as_str() }));

        let redis_errors = Family::<KindLabels, Counter>::default();
        r.register(
            counter_name(REDIS_ERRORS_TOTAL),
            "Redis errors, by kind",
            redis_errors.clone(),
        );

        let blocked_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            BLOCKED_SECONDS,
            "Seconds acknowledgement has been blocked by a permanent Redis error (NOPERM, OOM); 0 when not",
            blocked_seconds.clone(),
        );

        let reconnect_family = Family::<TargetLabels, Counter>::default();
        r.register(
            counter_name(RECONNECTS_TOTAL),
            "Reconnections, by target (postgres, redis)",
            reconnect_family.clone(),
        );
        let reconnects = [Target::Postgres, Target::Redis]
            .map(|t| reconnect_family.get_or_create_owned(&TargetLabels { target: t.as_str() }));

        let batch_size = Histogram::new(BATCH_SIZE_BUCKETS);
        r.register(
            BATCH_SIZE,
            "Redis operations per applied batch",
            batch_size.clone(),
        );
        let apply_latency = Histogram::new(APPLY_LATENCY_BUCKETS);
        r.register(
            APPLY_LATENCY_SECONDS,
            "Seconds from a transaction's commit time to its invalidations applied in Redis",
            apply_latency.clone(),
        );
        let heartbeat_lag = Gauge::<f64, AtomicU64>::default();
        r.register(
            HEARTBEAT_LAG_SECONDS,
            "Seconds the last heartbeat message took to come back through the replication stream",
            heartbeat_lag.clone(),
        );
        let role_family = Family::<RoleLabels, Gauge>::default();
        r.register(
            ROLE,
            "1 for this worker's current role (active, standby), 0 for the other",
            role_family.clone(),
        );
        let role = [Role::Active, Role::Standby]
            .map(|x| role_family.get_or_create_owned(&RoleLabels { role: x.as_str() }));
        let renamed_tables = Gauge::default();
        r.register(
            RENAMED_TABLES,
            "Mapped tables followed under a new name since start (see /readyz)",
            renamed_tables.clone(),
        );

        let missing_columns = Gauge::default();
        r.register(
            MISSING_COLUMNS,
            "Placeholder columns of mappings their table no longer has (see /readyz); those tables fall back to their truncate invalidations",
            missing_columns.clone(),
        );
        let requested = Family::<SourceKindLabels, Counter>::default();
        r.register(
            counter_name(REQUESTED_INVALIDATIONS_TOTAL),
            "Invalidations requested other than by a mapping rule, by source (declared: the SQL API) and kind",
            requested.clone(),
        );
        let declared = InvalidationKind::ALL.map(|k| {
            requested.get_or_create_owned(&SourceKindLabels {
                source: "declared",
                kind: k.as_str(),
            })
        });
        let visibility_wait = Histogram::new(VISIBILITY_WAIT_BUCKETS);
        r.register(
            VISIBILITY_WAIT_SECONDS,
            "Seconds a batch waited for its transactions to be visible on the primary (checks that needed a query)",
            visibility_wait.clone(),
        );
        let visibility_waiting = Gauge::default();
        r.register(
            VISIBILITY_WAITING,
            "1 while a batch waits for its transactions to be visible on the primary",
            visibility_waiting.clone(),
        );
        let replica_up = Family::<ReplicaLabels, Gauge>::default();
        r.register(
            REPLICA_UP,
            "1 while a listed read replica is reachable and in recovery",
            replica_up.clone(),
        );
        let replica_lag_bytes = Family::<ReplicaLabels, Gauge<u64, AtomicU64>>::default();
        r.register(
            REPLICA_LAG_BYTES,
            "Bytes between the primary's WAL end and the replica's replay position",
            replica_lag_bytes.clone(),
        );
        let replica_lag_seconds = Family::<ReplicaLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            REPLICA_LAG_SECONDS,
            "Seconds since the replica's last replayed transaction while it is behind what it received; 0 when caught up",
            replica_lag_seconds.clone(),
        );
        let replica_waits = Family::<ReplicaLabels, Counter>::default();
        r.register(
            counter_name(REPLICA_WAITS_TOTAL),
            "Batches that waited for the replica to replay them",
            replica_waits.clone(),
        );
        let replica_timeouts = Family::<ReplicaLabels, Counter>::default();
        r.register(
            counter_name(REPLICA_TIMEOUTS_TOTAL),
            "Batches applied before the replica replayed them (replica_max_wait_ms)",
            replica_timeouts.clone(),
        );
        let replica_reapplies = Family::<ReplicaLabels, Counter>::default();
        r.register(
            counter_name(REPLICA_REAPPLIES_TOTAL),
            "Re-applications once the replica replayed what was applied ahead of it (timed out or down)",
            replica_reapplies.clone(),
        );
        let broken_tables = Gauge::default();
        r.register(
            BROKEN_TABLES,
            "Mapped tables DDL broke (dropped, a mapped column gone), invalidated by their truncate fallback (see /readyz)",
            broken_tables.clone(),
        );
        let publication_drift = Gauge::default();
        r.register(
            PUBLICATION_DRIFT,
            "1 while the publication hides changes the mappings need (see /readyz), else 0",
            publication_drift.clone(),
        );
        let publication_drifts = Counter::default();
        r.register(
            counter_name(PUBLICATION_DRIFTS_TOTAL),
            "Times the publication was found hiding changes the mappings need",
            publication_drifts.clone(),
        );

        let patterns = patterns::PatternMetrics::register(&mut r);

        Arc::new(Metrics {
            patterns,
            registry: r,
            replication_lag_bytes,
            confirmed_lsn,
            transactions,
            changes,
            change_cache: TableCounters::new(),
            invalidations,
            fallbacks,
            fallback_cache: TableCounters::new(),
            flushes,
            redis_errors,
            blocked_seconds,
            blocked_since: Mutex::new(None),
            reconnects,
            batch_size,
            apply_latency,
            heartbeat_lag,
            role,
            renamed_tables,
            missing_columns,
            declared,
            visibility_wait,
            visibility_waiting,
            replica_up,
            replica_lag_bytes,
            replica_lag_seconds,
            replica_waits,
            replica_timeouts,
            replica_reapplies,
            broken_tables,
            publication_drift,
            publication_drifts,
        })
    }

    /// `n` committed transactions applied and acknowledged-to-be.
    pub fn transaction(&self, n: u64) {
        self.transactions.inc_by(n);
    }

    /// One row change of a mapped table (`table` as `schema.table`).
    pub fn change(&self, table: &str, op: Op) {
        self.change_cache
            .get(table, op, || {
                self.changes.get_or_create_owned(&TableOpLabels {
                    table: table.to_owned(),
                    op: op.as_str(),
                })
            })
            .inc();
    }

    /// Creates, at 0, the labelled series whose label values are known before
    /// the first event: every op of every mapped table, every fallback reason
    /// of every mapped table, every Redis error kind. Dashboards and alerts
    /// (`increase(...)`, `absent(...)`) then see them from the first scrape.
    pub fn start_at_zero(
        &self,
        tables: &[String],
        fallback_reasons: &[&'static str],
        error_kinds: &[&'static str],
    ) {
        for table in tables {
            for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
                let _ = self.changes.get_or_create(&TableOpLabels {
                    table: table.clone(),
                    op: op.as_str(),
                });
            }
            for &reason in fallback_reasons {
                let _ = self.fallbacks.get_or_create(&TableReasonLabels {
                    table: table.clone(),
                    reason,
                });
            }
        }
        for &kind in error_kinds {
            let _ = self.redis_errors.get_or_create(&KindLabels { kind });
        }
    }

    /// `n` invalidations of one kind sent to Redis.
    pub fn invalidations(&self, kind: InvalidationKind, n: u64) {
        self.invalidations[kind as usize].inc_by(n);
    }

    /// One change fell back to its table's truncate invalidations; `reason` is
    /// a stable name such as [`crate::plan::FallbackReason::as_str`].
    pub fn fallback(&self, table: &str, reason: &'static str) {
        self.fallback_cache
            .get(table, reason, || {
                self.fallbacks.get_or_create_owned(&TableReasonLabels {
                    table: table.to_owned(),
                    reason,
                })
            })
            .inc();
    }

    /// `n` declared invalidations of one kind planned (`source="declared"`).
    pub fn declared(&self, kind: InvalidationKind, n: u64) {
        self.declared[kind as usize].inc_by(n);
    }

    /// One flush fired by the worker.
    pub fn flush(&self, reason: FlushReason) {
        self.flushes[reason as usize].inc();
    }

    /// One Redis error; `kind` is a stable name such as [`crate::sink::SinkError::kind`].
    pub fn redis_error(&self, kind: &'static str) {
        self.redis_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Acknowledgement blocked since `Some(instant)` by a permanent Redis error,
    /// or no longer blocked (`None`). The gauge grows at each scrape while blocked.
    pub fn set_blocked(&self, since: Option<Instant>) {
        *lock(&self.blocked_since) = since;
        if since.is_none() {
            self.blocked_seconds.set(0.0);
        }
    }

    /// One reconnection.
    pub fn reconnect(&self, target: Target) {
        self.reconnects[target as usize].inc();
    }

    /// One applied batch of `ops` Redis operations.
    pub fn batch(&self, ops: u64) {
        // u64 -> f64 loses precision only above 2^53 operations.
        self.batch_size.observe(ops as f64);
    }

    /// Commit time to applied in Redis, for one transaction.
    pub fn apply_latency(&self, latency: Duration) {
        self.apply_latency.observe(latency.as_secs_f64());
    }

    /// The LSN confirmed to PostgreSQL, and the WAL lag behind the server's
    /// end when known (`None` leaves the lag gauge as it was).
    pub fn confirmed(&self, lsn: u64, lag_bytes: Option<u64>) {
        self.confirmed_lsn.set(lsn);
        if let Some(lag) = lag_bytes {
            self.replication_lag_bytes.set(lag);
        }
    }

    /// How long the last heartbeat took to come back through the stream.
    pub fn heartbeat_lag(&self, lag: Duration) {
        self.heartbeat_lag.set(lag.as_secs_f64());
    }

    /// This worker's role: sets its gauge to 1 and the other's to 0.
    pub fn set_role(&self, role: Role) {
        self.role[Role::Active as usize].set(i64::from(role == Role::Active));
        self.role[Role::Standby as usize].set(i64::from(role == Role::Standby));
    }

    /// How many mapped tables are followed under a new name.
    pub fn set_renamed_tables(&self, n: u64) {
        self.renamed_tables
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A batch waits (or no longer waits) for visibility on the primary.
    pub fn set_visibility_waiting(&self, waiting: bool) {
        self.visibility_waiting.set(i64::from(waiting));
    }

    /// One visibility check that needed a query, and how long it waited.
    pub fn visibility_wait(&self, waited: Duration) {
        self.visibility_wait.observe(waited.as_secs_f64());
    }

    fn replica_labels(replica: &str) -> ReplicaLabels {
        ReplicaLabels {
            replica: replica.to_owned(),
        }
    }

    /// Whether the read replica `replica` (`host:port`) is up.
    pub fn replica_up(&self, replica: &str, up: bool) {
        self.replica_up
            .get_or_create(&Self::replica_labels(replica))
            .set(i64::from(up));
    }

    /// The replica's replay lag in bytes and seconds.
    pub fn replica_lag(&self, replica: &str, bytes: u64, seconds: f64) {
        let labels = Self::replica_labels(replica);
        self.replica_lag_bytes.get_or_create(&labels).set(bytes);
        self.replica_lag_seconds.get_or_create(&labels).set(seconds);
    }

    /// A batch waited for the replica to replay it.
    pub fn replica_wait(&self, replica: &str) {
        self.replica_waits
            .get_or_create(&Self::replica_labels(replica))
            .inc();
    }

    /// A batch was applied before the replica replayed it.
    pub fn replica_timeout(&self, replica: &str) {
        self.replica_timeouts
            .get_or_create(&Self::replica_labels(replica))
            .inc();
    }

    /// A batch was applied again after the replica caught up.
    pub fn replica_reapplied(&self, replica: &str) {
        self.replica_reapplies
            .get_or_create(&Self::replica_labels(replica))
            .inc();
    }

    /// How many mapped tables DDL broke.
    pub fn set_broken_tables(&self, n: usize) {
        self.broken_tables.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Publication drift: `Some(true)` newly detected (counted), `Some(false)`
    /// still there, `None` gone.
    pub fn set_publication_drift(&self, drift: Option<bool>) {
        if drift == Some(true) {
            self.publication_drifts.inc();
        }
        self.publication_drift.set(i64::from(drift.is_some()));
    }

    /// How many mapped placeholder columns their table no longer has.
    pub fn set_missing_columns(&self, n: u64) {
        self.missing_columns
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition of every metric, `# EOF` included.
    pub fn render(&self) -> String {
        if let Some(since) = *lock(&self.blocked_since) {
            self.blocked_seconds.set(since.elapsed().as_secs_f64());
        }
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail; label values are escaped by the encoder.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// How long the run loop may go without [`Health::touch`] before `/livez` fails.
pub const LIVENESS_STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct HealthState {
    /// `Err(why)` while not streaming.
    streaming: Result<(), String>,
    /// `Err(why)` while Redis is unreachable.
    redis: Result<(), String>,
    blocked: Option<String>,
    role: Option<Role>,
    renamed: Option<String>,
    broken: Option<String>,
    drift: Option<String>,
    missing_columns: Option<String>,
    heartbeat_lag: Option<Duration>,
    /// Why the visibility check on the primary cannot run (503).
    visibility: Option<String>,
    /// Read replicas that are down, and why (detail only: 200 stays 200).
    replicas_down: std::collections::BTreeMap<String, String>,
}

/// Readiness and liveness, shared between the worker (which sets it) and the
/// HTTP endpoint (which reads it). Starts "not streaming: starting" and
/// "redis unreachable: not connected yet".
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    started: Instant,
    /// Milliseconds since `started` of the last loop tick.
    last_tick_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(HealthState {
                streaming: Err("starting".into()),
                redis: Err("not connected yet".into()),
                blocked: None,
                role: None,
                renamed: None,
                broken: None,
                drift: None,
                missing_columns: None,
                heartbeat_lag: None,
                visibility: None,
                replicas_down: std::collections::BTreeMap::new(),
            }),
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// A fresh state, shared.
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    /// The run loop is alive: call on every iteration (or at least every few
    /// seconds, standby included). Cheap: one atomic store.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Streaming the slot.
    pub fn set_streaming(&self) {
        lock(&self.state).streaming = Ok(());
    }

    /// Not streaming, and why (`connecting to 10.0.0.5:5432`, `connection lost: ...`).
    pub fn set_not_streaming(&self, why: impl Into<String>) {
        lock(&self.state).streaming = Err(why.into());
    }

    /// Redis answered.
    pub fn set_redis_reachable(&self) {
        lock(&self.state).redis = Ok(());
    }

    /// Redis did not answer, and why.
    pub fn set_redis_unreachable(&self, why: impl Into<String>) {
        lock(&self.state).redis = Err(why.into());
    }

    /// Acknowledgement blocked by a permanent Redis error (`Some("NOPERM ...")`), or no longer.
    pub fn set_blocked(&self, reason: Option<String>) {
        lock(&self.state).blocked = reason;
    }

    /// This worker's role.
    pub fn set_role(&self, role: Role) {
        lock(&self.state).role = Some(role);
    }

    /// Mapped tables followed under a new name (`Some("public.users -> public.people")`), or none.
    pub fn set_renamed(&self, reason: Option<String>) {
        lock(&self.state).renamed = reason;
    }

    /// Mapped tables DDL broke, invalidated by fallback (`Some("public.posts: ...")`), or none.
    pub fn set_broken(&self, reason: Option<String>) {
        lock(&self.state).broken = reason;
    }

    /// What the publication hides from the mappings, or `None` when nothing.
    pub fn set_drift(&self, reason: Option<String>) {
        lock(&self.state).drift = reason;
    }

    /// Mapped placeholder columns their table no longer has
    /// (`Some("public.posts.author_id")`), or none.
    pub fn set_missing_columns(&self, reason: Option<String>) {
        lock(&self.state).missing_columns = reason;
    }

    /// How long the last heartbeat took to come back through the stream.
    pub fn set_heartbeat_lag(&self, lag: Duration) {
        lock(&self.state).heartbeat_lag = Some(lag);
    }

    /// The visibility check on the primary cannot run (`Some(why)`: batches
    /// wait, 503), or runs again (`None`).
    pub fn set_visibility_blocked(&self, why: Option<String>) {
        lock(&self.state).visibility = why;
    }

    /// A read replica is down (`Some(why)`) or up again (`None`). Shown in
    /// `/readyz` without failing it: a down replica serves no reader.
    pub fn set_replica_down(&self, replica: &str, why: Option<String>) {
        let mut s = lock(&self.state);
        match why {
            Some(why) => s.replicas_down.insert(replica.to_owned(), why),
            None => s.replicas_down.remove(replica),
        };
    }

    /// The last heartbeat lag, if a heartbeat came back yet.
    pub fn heartbeat_lag(&self) -> Option<Duration> {
        lock(&self.state).heartbeat_lag
    }

    /// `(200, "ok")` while streaming with Redis reachable, nothing blocked, no
    /// renamed or broken table, no missing mapped column and no publication
    /// drift; otherwise 503 and one
    /// reason per line.
    pub fn readyz(&self) -> (u16, String) {
        let s = lock(&self.state);
        let mut reasons: Vec<String> = Vec::new();
        if s.role == Some(Role::Standby) {
            reasons.push("standby".into());
        } else if let Err(why) = &s.streaming {
            reasons.push(format!("not streaming: {why}"));
        }
        if let Err(why) = &s.redis {
            reasons.push(format!("redis unreachable: {why}"));
        }
        if let Some(b) = &s.blocked {
            reasons.push(format!("blocked: {b}"));
        }
        if let Some(r) = &s.renamed {
            reasons.push(format!("renamed table {r}"));
        }
        if let Some(m) = &s.missing_columns {
            reasons.push(format!(
                "mapped column missing {m}: those tables fall back to their truncate invalidations; fix the mappings"
            ));
        }
        if let Some(v) = &s.visibility {
            reasons.push(format!("visibility check failing: {v}"));
        }
        let details: Vec<String> = s
            .replicas_down
            .iter()
            .map(|(name, why)| format!("replica {name} down (not waited for): {why}"))
            .collect();
        if let Some(d) = &s.drift {
            reasons.push(format!("publication drift: {d}"));
        }
        if let Some(b) = &s.broken {
            reasons.push(format!("broken mapping (fallback): {b}"));
        }
        if reasons.is_empty() {
            let mut body = String::from("ok");
            for d in details {
                body.push('\n');
                body.push_str(&d);
            }
            (200, body)
        } else {
            reasons.extend(details);
            (503, reasons.join("\n"))
        }
    }

    /// 200 while the run loop touched the state within [`LIVENESS_STALE_AFTER`], 503 otherwise.
    pub fn livez(&self) -> (u16, String) {
        self.livez_at(Instant::now())
    }

    fn livez_at(&self, now: Instant) -> (u16, String) {
        let last = self.started + Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        let idle = now.saturating_duration_since(last);
        if idle > LIVENESS_STALE_AFTER {
            (
                503,
                format!("run loop stalled: last tick {} s ago", idle.as_secs()),
            )
        } else {
            (200, "ok".into())
        }
    }
}

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr} for metrics: {what}; change [metrics] listen")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What went wrong, in words (`address in use`).
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Binds the metrics listener, with an error that names the address and the setting to change.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            what: match source.kind() {
                io::ErrorKind::AddrInUse => "address in use",
                io::ErrorKind::AddrNotAvailable => "address not available on this host",
                io::ErrorKind::PermissionDenied => "permission denied",
                _ => "bind failed",
            },
            source,
        })
}

/// Serves `/metrics`, `/livez` and `/readyz` on `listen` until shutdown is
/// requested. See [`serve_on`] for a pre-bound listener.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: crate::shutdown::Shutdown,
) -> Result<(), ServeError> {
    let listener = bind(listen).await?;
    serve_on(listener, metrics, health, stop).await;
    Ok(())
}

/// Serves on an already bound listener (tests bind `127.0.0.1:0`). Returns
/// when shutdown is requested; open connections are dropped then.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut stop: crate::shutdown::Shutdown,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // Shutdown first.
            () = stop.requested() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
                    conns.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let svc = hyper::service::service_fn(move |req| {
                            let resp = respond(&req, &m, &h);
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(io, svc)
                            .await;
                    });
                }
                Err(err) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %err, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

/// Content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

fn respond<B>(req: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(405, TEXT, "method not allowed: use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(200, OPENMETRICS, metrics.render()),
        "/livez" => {
            let (code, body) = health.livez();
            reply(code, TEXT, body)
        }
        "/readyz" => {
            let (code, body) = health.readyz();
            reply(code, TEXT, body)
        }
        _ => reply(
            404,
            TEXT,
            "not found: try /metrics, /livez or /readyz\n".into(),
        ),
    }
}

fn reply(code: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    if code == 405 {
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    resp
}

pub mod patterns;
#[cfg(test)]
mod tests;
