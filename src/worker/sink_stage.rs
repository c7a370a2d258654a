//! The sink stage: applies batches in order through an [`ApplySink`],
//! retrying each until the sink confirms it, then acknowledges it.
//!
//! The one place a batch waits before it is applied is marked in
//! [`sink_stage`] ("before applying this batch"): checks that must hold before
//! Redis sees a batch go there.

use std::time::Instant;

use tokio::sync::mpsc;

use super::backoff::Backoff;
use super::failpoint::{failpoint, AFTER_APPLY_BEFORE_ACK};
use crate::ack::Acknowledger;
use crate::plan::{Batch, Plan};
use crate::sink::{identity, ApplySink, ApplyStats, RetryClass, SinkError, SinkObserver};
use crate::visibility::VisibilityGate;

/// Guarantee 6 (ARCHITECTURE.md): what the sink stage checks before applying, at start and
/// after every Redis error, and the plan it fires when Redis changed.
#[derive(Debug, Clone)]
pub struct IdentityGuard {
    /// `cache-invalidator:<slot>:identity`.
    pub key: String,
    /// PostgreSQL system identifier.
    pub pg_system_id: String,
    /// PostgreSQL timeline.
    pub pg_timeline: u32,
    /// The slot came through slot synchronization from a former primary
    /// (`pg_replication_slots.synced`, PostgreSQL 17+): after a promotion
    /// (same system, later timeline) its position continues, so no flush.
    pub slot_synced: bool,
    /// Every mapped table's truncate invalidations.
    pub flush_plan: Plan,
    /// Set by the Redis probe when Redis was unreachable: verify the identity
    /// again before the next batch (Redis may have restarted from a snapshot).
    pub recheck: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Verifies the Redis identity; when it changed (or is missing), applies the
/// flush plan and stores the new identity. Errors are retried by the caller.
async fn ensure_identity<S: ApplySink>(
    sink: &mut S,
    guard: &IdentityGuard,
    observer: &mut dyn SinkObserver,
) -> Result<(), SinkError> {
    let current = identity::Identity {
        redis_run_id: sink.redis_run_id().await?,
        pg_system_id: guard.pg_system_id.clone(),
        pg_timeline: guard.pg_timeline,
    };
    let reason = match sink.check_identity(&guard.key, &current).await? {
        identity::IdentityCheck::Unchanged => return Ok(()),
        identity::IdentityCheck::Missing => {
            tracing::warn!(key = %guard.key, "no worker identity in Redis (first run, or Redis lost its data): flushing every mapped table");
            "identity_missing"
        }
        identity::IdentityCheck::Changed { stored } => {
            match identity::promoted_from(&stored, &current) {
                Some(from) if guard.slot_synced => {
                    tracing::info!(key = %guard.key, from_timeline = from, to_timeline = current.pg_timeline, "PostgreSQL was promoted and the slot was synchronized from the former primary: resuming from its position without a flush");
                    sink.store_identity(&guard.key, &current).await?;
                    return Ok(());
                }
                Some(from) => {
                    tracing::warn!(key = %guard.key, from_timeline = from, to_timeline = current.pg_timeline, "the PostgreSQL timeline moved and the slot was not synchronized from a former primary (a restored backup, or a slot created after a failover): flushing every mapped table")
                }
                None => {
                    tracing::warn!(key = %guard.key, %stored, current = %current, "Redis or PostgreSQL changed since the last acknowledgement (restart from a snapshot, another database): flushing every mapped table")
                }
            }
            "identity_changed"
        }
    };
    sink.apply(&guard.flush_plan).await?;
    sink.store_identity(&guard.key, &current).await?;
    observer.flushed(reason);
    Ok(())
}

/// Applies batches in order, retrying each until Redis confirms it, then
/// acknowledges. Returns when the batch channel closes, or with the error when
/// it is fatal. Before the first batch and after any Redis error, the Redis
/// identity is verified (guarantee 6). Before a batch is applied, `gate`
/// waits until its transactions are visible on the primary and replayed by
/// the listed replicas (guarantee 8); nothing later is applied or
/// acknowledged meanwhile, and the stream keeps its status updates.
pub async fn sink_stage<S: ApplySink>(
    mut batches: mpsc::Receiver<Batch>,
    sink: &mut S,
    ack: &mut Acknowledger,
    guard: &IdentityGuard,
    gate: &mut VisibilityGate,
    observer: &mut dyn SinkObserver,
) -> Result<(), SinkError> {
    let mut verify_identity = true;
    while let Some(batch) = batches.recv().await {
        if guard
            .recheck
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            verify_identity = true;
        }
        // Before applying this batch: the one place a batch may wait for a
        // condition outside the pipeline. Nothing of it has reached Redis yet.
        let passed = gate.before_apply(&batch).await;
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let stats = loop {
            let attempt = async {
                if verify_identity {
                    ensure_identity(sink, guard, observer).await?;
                }
                if batch.plan.is_empty() {
                    Ok(ApplyStats::default())
                } else {
                    sink.apply(&batch.plan).await
                }
            };
            match attempt.await {
                Ok(stats) => {
                    verify_identity = false;
                    break stats;
                }
                Err(err) if err.retry_class() == RetryClass::Fatal => return Err(err),
                Err(err) => {
                    verify_identity = true;
                    let delay = backoff.next_delay();
                    observer.failed(&err, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        };
        observer.applied(&batch, &stats, started.elapsed());
        gate.applied(passed, &batch);
        if batch.transactions > 0 {
            // A transaction applied in Redis and not yet acknowledged.
            failpoint(AFTER_APPLY_BEFORE_ACK);
        }
        if let Some(lsn) = batch.ack {
            if ack.confirm(lsn) {
                observer.acknowledged(lsn);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::lsn::Lsn;
    use crate::sink::MemorySink;

    #[derive(Default)]
    struct Flushes(Vec<&'static str>);

    impl SinkObserver for Flushes {
        fn applied(&mut self, _: &Batch, _: &ApplyStats, _: Duration) {}
        fn acknowledged(&mut self, _: Lsn) {}
        fn failed(&mut self, _: &SinkError, _: Duration) {}
        fn flushed(&mut self, reason: &'static str) {
            self.0.push(reason);
        }
    }

    fn guard(timeline: u32, slot_synced: bool) -> IdentityGuard {
        let mut flush_plan = Plan::default();
        flush_plan.patterns.insert("user:*");
        IdentityGuard {
            key: "cache-invalidator:s:identity".into(),
            pg_system_id: "7412".into(),
            pg_timeline: timeline,
            slot_synced,
            flush_plan,
            recheck: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs one batch through the stage with the identity stored on
    /// timeline 1 and the current one on `guard`'s: the reasons flushed.
    async fn one_batch(sink: &mut MemorySink, guard: &IdentityGuard) -> Vec<&'static str> {
        let stored = identity::Identity {
            redis_run_id: "memory-1".into(),
            pg_system_id: "7412".into(),
            pg_timeline: 1,
        };
        sink.store_identity(&guard.key, &stored).await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        tx.send(Batch::default()).await.unwrap();
        drop(tx);
        let (mut ack, _acked) = Acknowledger::new(Lsn::ZERO);
        let mut observer = Flushes::default();
        let mut gate = VisibilityGate::disabled();
        sink_stage(rx, sink, &mut ack, guard, &mut gate, &mut observer)
            .await
            .unwrap();
        observer.0
    }

    #[tokio::test]
    async fn a_promotion_with_a_synchronized_slot_keeps_the_cache() {
        let mut sink = MemorySink::new();
        let guard = guard(2, true);
        assert!(one_batch(&mut sink, &guard).await.is_empty());
        assert!(sink.applied().is_empty(), "flushed: {:?}", sink.applied());
        assert_eq!(sink.identity(&guard.key).unwrap().pg_timeline, 2);
    }

    #[tokio::test]
    async fn a_new_timeline_without_a_synchronized_slot_flushes() {
        let mut sink = MemorySink::new();
        let guard = guard(2, false);
        assert_eq!(one_batch(&mut sink, &guard).await, vec!["identity_changed"]);
        assert_eq!(sink.applied(), vec![guard.flush_plan.clone()]);
        assert_eq!(sink.identity(&guard.key).unwrap().pg_timeline, 2);
    }

    #[tokio::test]
    async fn another_redis_flushes_even_with_a_synchronized_slot() {
        let mut sink = MemorySink::new();
        let guard = guard(2, true);
        sink.set_run_id("memory-2");
        assert_eq!(one_batch(&mut sink, &guard).await, vec!["identity_changed"]);
        assert_eq!(sink.applied(), vec![guard.flush_plan.clone()]);
    }
}
