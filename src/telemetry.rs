//! What the running worker reports: metrics, the health behind `/readyz`,
//! log lines, and the heartbeat that measures end-to-end lag.
//!
//! One [`Telemetry`] is shared by the stages of `run`. Each stage event is one
//! call here, which updates the metric, the health state and, for failures,
//! one log line per distinct cause.

use crate::log_fields::{ERROR, ERROR_KIND, REASON, TABLE};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::decode::{Op, Timestamp};
use crate::lsn::Lsn;
use crate::metrics::{
    BrokenReason, FlushReason, Health, InvalidationKind, Metrics, RefreshOutcome, Role, Target,
};
use crate::plan::Batch;
use crate::sink::SinkObserver;
use crate::sink::{ApplyStats, RetryClass, SinkError};

pub use crate::plan::planner::HEARTBEAT;
/// How often the heartbeat is emitted.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

pub use crate::repeats::Repeats;

/// Shared reporting state of one worker process.
pub struct Telemetry {
    /// The Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// The `/readyz` and `/livez` state.
    pub health: Arc<Health>,
    /// Highest WAL end the server reported (for lag in bytes).
    wal_end: AtomicU64,
    /// Heartbeats emitted and not yet seen in the stream: (LSN, when).
    heartbeats: Mutex<VecDeque<(Lsn, Instant)>>,
    /// Tables in fallback because their mapping no longer fits the schema:
    /// found at start, and found at run time (one table counts once).
    broken: Mutex<Broken>,
}

/// The tables behind `cache_invalidator_broken_tables{reason}`.
#[derive(Debug, Default)]
struct Broken {
    /// Found at start (the preflight's catalog snapshot).
    at_start: BTreeMap<String, BrokenReason>,
    /// Found by the planner in a Relation message (a mapped column gone).
    at_run_time: BTreeSet<String>,
}

impl Broken {
    /// Tables per reason: a table found both ways counts once, under its
    /// start-time reason.
    fn counts(&self) -> [usize; BrokenReason::ALL.len()] {
        let mut all = self.at_start.clone();
        for t in &self.at_run_time {
            all.entry(t.clone()).or_insert(BrokenReason::MissingColumn);
        }
        let mut out = [0; BrokenReason::ALL.len()];
        for reason in all.values() {
            out[*reason as usize] += 1;
        }
        out
    }
}

impl Telemetry {
    /// Fresh state: not streaming, Redis not yet reached.
    pub fn new() -> Arc<Telemetry> {
        Arc::new(Telemetry {
            metrics: Metrics::new(),
            health: Health::new(),
            wal_end: AtomicU64::new(0),
            heartbeats: Mutex::new(VecDeque::new()),
            broken: Mutex::new(Broken::default()),
        })
    }

    /// Updates the broken-tables state and publishes its gauge.
    fn set_broken(&self, update: impl FnOnce(&mut Broken)) {
        let counts = {
            let mut b = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
            update(&mut b);
            b.counts()
        };
        for reason in BrokenReason::ALL {
            self.metrics
                .set_broken_tables(reason, counts[reason as usize]);
        }
    }

    /// The loop is alive (for `/livez`).
    pub fn touch(&self) {
        self.health.touch();
    }

    /// The server's WAL end as seen in XLogData or a keepalive.
    pub fn wal_end(&self, lsn: Lsn) {
        self.wal_end.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// The highest WAL end the server reported so far.
    pub fn wal_end_lsn(&self) -> Lsn {
        Lsn(self.wal_end.load(Ordering::Relaxed))
    }

    /// PostgreSQL now holds everything up to `lsn` as acknowledged.
    pub fn confirmed(&self, lsn: Lsn) {
        let end = self.wal_end.load(Ordering::Relaxed);
        self.metrics
            .confirmed(lsn.0, Some(end.saturating_sub(lsn.0)));
    }

    /// Streaming started (this worker holds the slot).
    pub fn streaming(&self) {
        self.metrics.set_role(Role::Active);
        self.health.set_role(Role::Active);
        self.health.set_streaming();
    }

    /// Another worker holds the slot; this one waits.
    pub fn standby(&self) {
        self.metrics.set_role(Role::Standby);
        self.health.set_role(Role::Standby);
        self.health
            .set_not_streaming("standby: another worker streams the slot");
    }

    /// The replication session ended; reconnecting.
    pub fn disconnected(&self, why: &str) {
        self.health.set_not_streaming(why.to_string());
        self.metrics.reconnect(Target::Postgres);
    }

    /// A row change was decoded.
    pub fn change(&self, table: &str, op: Op) {
        self.metrics.change(table, op);
    }

    /// A flush marker arrived in the stream.
    pub fn flush_marker(&self, all: bool) {
        self.metrics.flush(if all {
            FlushReason::MarkerAll
        } else {
            FlushReason::MarkerTable
        });
    }

    /// PostgreSQL skipped changes because the publication did not exist at
    /// their point in the WAL: every mapped table is flushed in stream order.
    pub fn publication_skipped(&self, publication: &str) {
        self.metrics.flush(FlushReason::PublicationGap);
        tracing::error!(
            publication,
            "the publication did not exist while changes were decoded (dropped, then recreated?): PostgreSQL skipped those changes without sending them, so every mapped table is flushed here, in stream order"
        );
    }

    /// Declared invalidations planned since the last call, by kind, and the
    /// full flushes of messages that could not be understood.
    pub fn declared(&self, d: &crate::plan::DeclaredCounters) {
        let m = &self.metrics;
        m.declared(InvalidationKind::Keys, d.keys);
        m.declared(InvalidationKind::Tags, d.tags);
        m.declared(InvalidationKind::Versions, d.versions);
        m.declared(InvalidationKind::Patterns, d.patterns);
        m.declared(InvalidationKind::Publish, d.publish);
        // Each message under our prefix that could not be understood flushed
        // every mapped table (rare: a loop is fine).
        for _ in 0..d.malformed {
            m.flush(FlushReason::MalformedMessage);
        }
    }

    /// A mapping fell back to the table's truncate invalidations, or (the
    /// `refresh_*` reasons) a refreshed key is unlinked instead of set.
    pub fn fallback(&self, table: &str, reason: crate::plan::FallbackReason, count: u64) {
        self.metrics.fallback(table, reason.as_str(), count);
        if reason.is_refresh() {
            let outcome = if reason == crate::plan::FallbackReason::RefreshTooLarge {
                RefreshOutcome::TooLarge
            } else {
                RefreshOutcome::UnlinkedFallback
            };
            self.metrics.refreshes(outcome, count);
        }
    }

    /// Mapped tables followed by OID after a rename (mapped name, current name).
    pub fn renamed(&self, renamed: &[(String, String)]) {
        self.metrics.set_renamed_tables(renamed.len() as u64);
        if renamed.is_empty() {
            self.health.set_renamed(None);
        } else {
            let list: Vec<String> = renamed.iter().map(|(a, b)| format!("{a} -> {b}")).collect();
            self.health.set_renamed(Some(list.join(", ")));
        }
    }

    /// Mapped tables DDL broke (table -> why), found at start: each logged
    /// once, counted, and named by `/readyz`; they run in fallback.
    pub fn broken_tables(
        &self,
        broken: &std::collections::BTreeMap<crate::map::TableName, String>,
    ) {
        self.set_broken(|b| {
            b.at_start = broken
                .iter()
                .map(|(t, why)| {
                    let reason = if why == crate::map::catalog::TABLE_MISSING {
                        BrokenReason::MissingTable
                    } else {
                        BrokenReason::MissingColumn
                    };
                    (t.to_string(), reason)
                })
                .collect();
        });
        if broken.is_empty() {
            self.health.set_broken(None);
            return;
        }
        for (table, why) in broken {
            tracing::error!(
                { TABLE } = %table,
                { REASON } = %why,
                "mapping broken by DDL: this table's changes fire its truncate invalidations (fallback) until the mapping or the table is fixed and the worker restarted; every other table is invalidated precisely"
            );
        }
        let list: Vec<String> = broken.iter().map(|(t, w)| format!("{t} ({w})")).collect();
        self.health.set_broken(Some(list.join(", ")));
    }

    /// Mapped placeholder columns the relations no longer have (table, column).
    pub fn missing_columns(&self, missing: &[(String, String)]) {
        self.set_broken(|b| b.at_run_time = missing.iter().map(|(t, _)| t.clone()).collect());
        if missing.is_empty() {
            self.health.set_missing_columns(None);
        } else {
            let list: Vec<String> = missing.iter().map(|(t, c)| format!("{t}.{c}")).collect();
            self.health.set_missing_columns(Some(list.join(", ")));
        }
    }

    /// A heartbeat was emitted at `lsn`.
    pub fn heartbeat_sent(&self, lsn: Lsn) {
        if let Ok(mut q) = self.heartbeats.lock() {
            q.push_back((lsn, Instant::now()));
            // Bounded: a stream that never returns them must not grow memory.
            while q.len() > 64 {
                q.pop_front();
            }
        }
    }

    /// A heartbeat came back through the stream at `lsn`.
    pub fn heartbeat_returned(&self, lsn: Lsn) {
        let Ok(mut q) = self.heartbeats.lock() else {
            return;
        };
        let mut lag = None;
        while let Some(&(sent_lsn, at)) = q.front() {
            if sent_lsn > lsn {
                break;
            }
            lag = Some(at.elapsed());
            q.pop_front();
        }
        if let Some(lag) = lag {
            self.metrics.heartbeat_lag(lag);
            self.health.set_heartbeat_lag(lag);
        }
    }

    /// Reports the age of the oldest outstanding heartbeat when it exceeds the
    /// last measured lag, so a stream that stopped returning them shows it.
    pub fn heartbeat_tick(&self) {
        let oldest = self
            .heartbeats
            .lock()
            .ok()
            .and_then(|q| q.front().map(|&(_, at)| at.elapsed()));
        if let Some(age) = oldest {
            if self.health.heartbeat_lag().map(|l| age > l).unwrap_or(true)
                && age > HEARTBEAT_INTERVAL
            {
                self.metrics.heartbeat_lag(age);
                self.health.set_heartbeat_lag(age);
            }
        }
    }
}

/// The sink stage's observer: metrics, health, one log line per distinct failure.
pub struct SinkReporter {
    telemetry: Arc<Telemetry>,
    failures: Repeats,
    blocked_since: Option<Instant>,
    progress: (u64, u64),
    progress_since: Instant,
}

/// How often the progress line is logged.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(30);

impl SinkReporter {
    /// A reporter writing to `telemetry`.
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        SinkReporter {
            telemetry,
            failures: Repeats::default(),
            blocked_since: None,
            progress: (0, 0),
            progress_since: Instant::now(),
        }
    }
}

impl SinkObserver for SinkReporter {
    fn applied(&mut self, batch: &Batch, stats: &ApplyStats, elapsed: Duration) {
        let t = &self.telemetry;
        if self.failures.clear() {
            tracing::info!("Redis recovered; applying and acknowledging again");
            t.metrics.reconnect(Target::Redis);
        }
        if self.blocked_since.take().is_some() {
            t.metrics.set_blocked(None);
        }
        t.health.set_blocked(None);
        t.health.set_redis_reachable();
        let m = &t.metrics;
        m.transaction(batch.transactions);
        m.invalidations(InvalidationKind::Keys, stats.keys);
        m.invalidations(InvalidationKind::Tags, stats.tags);
        m.invalidations(InvalidationKind::Versions, stats.versions);
        m.invalidations(InvalidationKind::Patterns, stats.pattern_matches);
        m.invalidations(InvalidationKind::Publish, stats.published);
        m.refreshes(RefreshOutcome::Set, stats.refreshed);
        m.refreshes(RefreshOutcome::Kept, stats.refresh_kept);
        m.batch(batch.plan.ops() as u64);
        if let Some(commit) = batch.first_commit_time {
            let micros = Timestamp::now().0.saturating_sub(commit.0);
            m.apply_latency(Duration::from_micros(u64::try_from(micros).unwrap_or(0)));
        }
        tracing::debug!(
            transactions = batch.transactions,
            changes = batch.changes,
            keys = stats.keys,
            tags = stats.tags,
            versions = stats.versions,
            published = stats.published,
            repaired = stats.repaired,
            refreshed = stats.refreshed,
            refresh_kept = stats.refresh_kept,
            elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            "batch applied"
        );
        if stats.repaired > 0 {
            tracing::warn!(
                repaired = stats.repaired,
                "keys of the wrong type under the tag or version prefix were unlinked and the step redone"
            );
        }
        self.progress.0 += batch.transactions;
        self.progress.1 += batch.changes;
        let since = self.progress_since.elapsed();
        if since >= PROGRESS_INTERVAL {
            let secs = since.as_secs_f64();
            tracing::info!(
                transactions_per_s = format!("{:.1}", self.progress.0 as f64 / secs),
                changes_per_s = format!("{:.1}", self.progress.1 as f64 / secs),
                "progress"
            );
            self.progress = (0, 0);
            self.progress_since = Instant::now();
        }
    }

    fn acknowledged(&mut self, lsn: Lsn) {
        self.telemetry.confirmed(lsn);
    }

    fn pattern_pass_started(&mut self, _patterns: u64) {
        self.telemetry.metrics.patterns.started();
    }

    fn pattern_pass_finished(&mut self, report: &crate::sink::PassReport) {
        self.telemetry.metrics.patterns.finished(report);
        self.telemetry
            .metrics
            .invalidations(InvalidationKind::Patterns, report.matched);
        tracing::debug!(
            patterns = report.patterns,
            scanned = report.scanned,
            matched = report.matched,
            elapsed_ms = u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
            "pattern pass finished"
        );
    }

    fn failed(&mut self, err: &SinkError, retry_in: Duration) {
        let t = &self.telemetry;
        t.metrics.redis_error(err.kind());
        let text = err.to_string();
        match err.retry_class() {
            // Redis answers; its replicas do not confirm: say so, not "unreachable".
            _ if matches!(err, SinkError::Replicas { .. }) => {
                t.health.set_blocked(Some(format!(
                    "waiting for Redis replicas ([redis] wait_replicas): {text}"
                )));
            }
            RetryClass::Blocked => {
                let since = *self.blocked_since.get_or_insert_with(Instant::now);
                t.metrics.set_blocked(Some(since));
                t.health.set_blocked(Some(text.clone()));
            }
            _ => t.health.set_redis_unreachable(text.clone()),
        }
        if let Some(count) = self.failures.tick_for(&text) {
            tracing::error!(
                { ERROR } = %text,
                { ERROR_KIND } = err.kind(),
                attempts = count,
                retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                "Redis failed; nothing is acknowledged until it succeeds"
            );
        }
    }

    fn flushed(&mut self, reason: &'static str) {
        self.telemetry.metrics.flush(FlushReason::IdentityChanged);
        tracing::warn!(reason, "flushed every mapped table");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_broken_at_start_and_at_run_time_counts_once() {
        let mut b = Broken::default();
        b.at_start
            .insert("public.gone".into(), BrokenReason::MissingTable);
        b.at_start
            .insert("public.codes".into(), BrokenReason::MissingColumn);
        b.at_run_time.insert("public.codes".into());
        b.at_run_time.insert("public.items".into());
        // missing_table: gone; missing_column: codes (once), items.
        assert_eq!(b.counts(), [1, 2]);
        b.at_run_time.clear();
        assert_eq!(b.counts(), [1, 1]);
    }
}
