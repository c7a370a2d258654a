//! [`Metrics`]: every metric registered in one [`Registry`], and the update
//! methods the worker calls.
//!
//! Hot path: counters whose labels are a closed set (invalidation kinds, flush
//! reasons, reconnect targets, roles) are created up front and indexed by enum;
//! per-table counters are cached per table name, so a repeated `(table, op)`
//! costs one uncontended mutex and one atomic add, no allocation.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::label_sets::{
    KindLabels, OutcomeLabels, ReasonLabels, ReplicaLabels, RoleLabels, SourceKindLabels,
    TableCounters, TableOpLabels, TableReasonLabels, TargetLabels,
};
use super::{
    lock, names, patterns, registered, BrokenReason, FlushReason, InvalidationKind, RefreshOutcome,
    Role, Target,
};
use crate::decode::Op;

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

/// The worker's metrics. Create once with [`Metrics::new`], share the `Arc`,
/// serve it with [`super::serve`].
pub struct Metrics {
    registry: Registry,
    replication_lag_bytes: Gauge<u64, AtomicU64>,
    confirmed_lsn: Gauge<u64, AtomicU64>,
    transactions: Counter,
    changes: Family<TableOpLabels, Counter>,
    change_cache: TableCounters<Op>,
    invalidations: [Counter; InvalidationKind::ALL.len()],
    refreshes: [Counter; RefreshOutcome::ALL.len()],
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
    declared: [Counter; InvalidationKind::ALL.len()],
    visibility_wait: Histogram,
    visibility_waiting: Gauge,
    replica_up: Family<ReplicaLabels, Gauge>,
    replica_lag_bytes: Family<ReplicaLabels, Gauge<u64, AtomicU64>>,
    replica_lag_seconds: Family<ReplicaLabels, Gauge<f64, AtomicU64>>,
    replica_waits: Family<ReplicaLabels, Counter>,
    replica_timeouts: Family<ReplicaLabels, Counter>,
    replica_reapplies: Family<ReplicaLabels, Counter>,
    broken_tables: [Gauge; BrokenReason::ALL.len()],
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

        let replication_lag_bytes = registered(
            &mut r,
            REPLICATION_LAG_BYTES,
            "Bytes of WAL between the server's WAL end and the confirmed LSN",
            Gauge::<u64, AtomicU64>::default(),
        );
        let confirmed_lsn = registered(
            &mut r,
            CONFIRMED_LSN,
            "Last LSN confirmed to PostgreSQL, as a number",
            Gauge::<u64, AtomicU64>::default(),
        );
        let transactions = registered(
            &mut r,
            counter_name(TRANSACTIONS_TOTAL),
            "Committed transactions whose invalidations were applied",
            Counter::default(),
        );
        let changes = registered(
            &mut r,
            counter_name(CHANGES_TOTAL),
            "Row changes of mapped tables, by table and operation",
            Family::<TableOpLabels, Counter>::default(),
        );

        let inv_family = registered(
            &mut r,
            counter_name(INVALIDATIONS_TOTAL),
            "Redis invalidations sent, by kind (keys, tags, versions, patterns, publish)",
            Family::<KindLabels, Counter>::default(),
        );
        let invalidations = InvalidationKind::ALL
            .map(|k| inv_family.get_or_create_owned(&KindLabels { kind: k.as_str() }));

        let refresh_family = registered(&mut r, counter_name(REFRESHES_TOTAL), "Keys refresh rules wanted to set, by outcome (set, kept: Redis held a newer version, unlinked_fallback, too_large)", Family::<OutcomeLabels, Counter>::default());
        let refreshes = RefreshOutcome::ALL.map(|o| {
            refresh_family.get_or_create_owned(&OutcomeLabels {
                outcome: o.as_str(),
            })
        });

        let fallbacks = registered(&mut r, counter_name(FALLBACKS_TOTAL), "Changes that fired their table's truncate invalidations instead of their own, by table and reason", Family::<TableReasonLabels, Counter>::default());

        let flush_family = registered(
            &mut r,
            counter_name(FLUSHES_TOTAL),
            "Whole-table or whole-cache flushes, by reason",
            Family::<ReasonLabels, Counter>::default(),
        );
        let flushes = FlushReason::ALL
            .map(|f| flush_family.get_or_create_owned(&ReasonLabels { reason: f.as_str() }));

        let redis_errors = registered(
            &mut r,
            counter_name(REDIS_ERRORS_TOTAL),
            "Redis errors, by kind",
            Family::<KindLabels, Counter>::default(),
        );

        let blocked_seconds = registered(&mut r, BLOCKED_SECONDS, "Seconds acknowledgement has been blocked by a permanent Redis error (NOPERM, OOM); 0 when not", Gauge::<f64, AtomicU64>::default());

        let reconnect_family = registered(
            &mut r,
            counter_name(RECONNECTS_TOTAL),
            "Reconnections, by target (postgres, redis)",
            Family::<TargetLabels, Counter>::default(),
        );
        let reconnects = [Target::Postgres, Target::Redis]
            .map(|t| reconnect_family.get_or_create_owned(&TargetLabels { target: t.as_str() }));

        let batch_size = registered(
            &mut r,
            BATCH_SIZE,
            "Redis operations per applied batch",
            Histogram::new(BATCH_SIZE_BUCKETS),
        );
        let apply_latency = registered(
            &mut r,
            APPLY_LATENCY_SECONDS,
            "Seconds from a transaction's commit time to its invalidations applied in Redis",
            Histogram::new(APPLY_LATENCY_BUCKETS),
        );
        let heartbeat_lag = registered(
            &mut r,
            HEARTBEAT_LAG_SECONDS,
            "Seconds the last heartbeat message took to come back through the replication stream",
            Gauge::<f64, AtomicU64>::default(),
        );
        let role_family = registered(
            &mut r,
            ROLE,
            "1 for this worker's current role (active, standby), 0 for the other",
            Family::<RoleLabels, Gauge>::default(),
        );
        let role = [Role::Active, Role::Standby]
            .map(|x| role_family.get_or_create_owned(&RoleLabels { role: x.as_str() }));
        let renamed_tables = registered(
            &mut r,
            RENAMED_TABLES,
            "Mapped tables followed under a new name since start (see /readyz)",
            Gauge::default(),
        );

        let requested = registered(&mut r, counter_name(REQUESTED_INVALIDATIONS_TOTAL), "Invalidations requested other than by a mapping rule, by source (declared: the SQL API) and kind", Family::<SourceKindLabels, Counter>::default());
        let declared = InvalidationKind::ALL.map(|k| {
            requested.get_or_create_owned(&SourceKindLabels {
                source: "declared",
                kind: k.as_str(),
            })
        });
        let visibility_wait = registered(&mut r, VISIBILITY_WAIT_SECONDS, "Seconds a batch waited for its transactions to be visible on the primary (checks that needed a query)", Histogram::new(VISIBILITY_WAIT_BUCKETS));
        let visibility_waiting = registered(
            &mut r,
            VISIBILITY_WAITING,
            "1 while a batch waits for its transactions to be visible on the primary",
            Gauge::default(),
        );
        let replica_up = registered(
            &mut r,
            REPLICA_UP,
            "1 while a listed read replica is reachable and in recovery",
            Family::<ReplicaLabels, Gauge>::default(),
        );
        let replica_lag_bytes = registered(
            &mut r,
            REPLICA_LAG_BYTES,
            "Bytes between the primary's WAL end and the replica's replay position",
            Family::<ReplicaLabels, Gauge<u64, AtomicU64>>::default(),
        );
        let replica_lag_seconds = registered(&mut r, REPLICA_LAG_SECONDS, "Seconds since the replica's last replayed transaction while it is behind what it received; 0 when caught up", Family::<ReplicaLabels, Gauge<f64, AtomicU64>>::default());
        let replica_waits = registered(
            &mut r,
            counter_name(REPLICA_WAITS_TOTAL),
            "Batches that waited for the replica to replay them",
            Family::<ReplicaLabels, Counter>::default(),
        );
        let replica_timeouts = registered(
            &mut r,
            counter_name(REPLICA_TIMEOUTS_TOTAL),
            "Batches applied before the replica replayed them (replica_max_wait_ms)",
            Family::<ReplicaLabels, Counter>::default(),
        );
        let replica_reapplies = registered(&mut r, counter_name(REPLICA_REAPPLIES_TOTAL), "Re-applications once the replica replayed what was applied ahead of it (timed out or down)", Family::<ReplicaLabels, Counter>::default());
        let broken_family = registered(&mut r, BROKEN_TABLES, "Mapped tables in fallback because their mapping no longer fits the schema (a table dropped, a mapped column gone), invalidated by their truncate invalidations, by reason (see /readyz)", Family::<ReasonLabels, Gauge>::default());
        let broken_tables = BrokenReason::ALL
            .map(|b| broken_family.get_or_create_owned(&ReasonLabels { reason: b.as_str() }));
        let publication_drift = registered(
            &mut r,
            PUBLICATION_DRIFT,
            "1 while the publication hides changes the mappings need (see /readyz), else 0",
            Gauge::default(),
        );
        let publication_drifts = registered(
            &mut r,
            counter_name(PUBLICATION_DRIFTS_TOTAL),
            "Times the publication was found hiding changes the mappings need",
            Counter::default(),
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
            refreshes,
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

    /// `n` refreshed keys with one outcome.
    pub fn refreshes(&self, outcome: RefreshOutcome, n: u64) {
        self.refreshes[outcome as usize].inc_by(n);
    }

    /// One change fell back to its table's truncate invalidations; `reason` is
    /// a stable name such as [`crate::plan::FallbackReason::as_str`].
    pub fn fallback(&self, table: &str, reason: &'static str, n: u64) {
        self.fallback_cache
            .get(table, reason, || {
                self.fallbacks.get_or_create_owned(&TableReasonLabels {
                    table: table.to_owned(),
                    reason,
                })
            })
            .inc_by(n);
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

    /// How many mapped tables run in fallback for `reason`.
    pub fn set_broken_tables(&self, reason: BrokenReason, n: usize) {
        self.broken_tables[reason as usize].set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Publication drift: `Some(true)` newly detected (counted), `Some(false)`
    /// still there, `None` gone.
    pub fn set_publication_drift(&self, drift: Option<bool>) {
        if drift == Some(true) {
            self.publication_drifts.inc();
        }
        self.publication_drift.set(i64::from(drift.is_some()));
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

#[cfg(test)]
mod tests;
