//! What the worker's sink stage needs from a sink ([`ApplySink`]) and what it
//! tells whoever watches it ([`SinkObserver`]).
//!
//! Two sinks implement [`ApplySink`]: [`super::any::Sink`] (one Redis server or a
//! Redis Cluster) and [`super::memory::MemorySink`], the in-memory sink the
//! stage's unit tests drive (ARCHITECTURE.md, "Testing the stages").

use std::future::Future;
use std::time::Duration;

use super::identity::{Identity, IdentityCheck};
use super::{ApplyStats, PassReport, SinkError};
use crate::lsn::Lsn;
use crate::plan::{Batch, Plan};

/// A place plans are applied to, with the identity record that detects a
/// Redis which lost acknowledged deletes (guarantee 6 in ARCHITECTURE.md).
///
/// Every method may fail with a [`SinkError`] whose
/// [`retry_class`](SinkError::retry_class) tells the caller whether to retry.
pub trait ApplySink: Send {
    /// Executes every step of `plan`; on error the whole plan is retried
    /// (every step is safe to repeat).
    fn apply(&mut self, plan: &Plan) -> impl Future<Output = Result<ApplyStats, SinkError>> + Send;

    /// The Redis `run_id` (on a cluster, every master's, sorted and joined).
    fn redis_run_id(&self) -> impl Future<Output = Result<String, SinkError>> + Send;

    /// Compares the identity stored under `key` with `current`.
    fn check_identity(
        &self,
        key: &str,
        current: &Identity,
    ) -> impl Future<Output = Result<IdentityCheck, SinkError>> + Send;

    /// Stores `current` under `key`.
    fn store_identity(
        &self,
        key: &str,
        current: &Identity,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// PING (on a cluster, every master).
    fn ping(&self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Where this sink writes, for log lines (passwords masked).
    fn target(&self) -> &str;
}

/// Observes what the sink stage does: metrics, health and log lines in `run`
/// (the telemetry's `SinkReporter`), a recorder in the stage's unit tests.
pub trait SinkObserver: Send {
    /// A batch was applied (its `ack`, if any, is confirmed right after).
    fn applied(&mut self, batch: &Batch, stats: &ApplyStats, elapsed: Duration);
    /// Everything up to `lsn` is acknowledged.
    fn acknowledged(&mut self, lsn: Lsn);
    /// An attempt failed; it will be retried after `retry_in`.
    fn failed(&mut self, err: &SinkError, retry_in: Duration);
    /// Every mapped table was flushed, for `reason` (e.g. `identity_missing`).
    fn flushed(&mut self, reason: &'static str);
    /// A pattern pass over `patterns` patterns started (the pattern lane).
    fn pattern_pass_started(&mut self, patterns: u64) {
        let _ = patterns;
    }
    /// A pattern pass finished.
    fn pattern_pass_finished(&mut self, report: &PassReport) {
        let _ = report;
    }
}
