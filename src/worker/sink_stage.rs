//! The sink stage: applies batches in order through an [`ApplySink`],
//! retrying each until the sink confirms it, then acknowledges it.
//!
//! The one place a batch waits before it is applied is marked in
//! [`sink_stage`] ("before applying this batch"): checks that must hold before
//! Redis sees a batch go there. Pattern passes run in their own lane
//! ([`super::pattern_lane`]), after that wait like the rest of the batch.

use std::time::Instant;

use tokio::sync::mpsc;

use super::pattern_lane::{AckQueue, LaneEvent, PatternLane, MAX_WAITING_PATTERNS};
use crate::ack::Acknowledger;
use crate::failpoint::{failpoint, AFTER_APPLY_BEFORE_ACK};
use crate::plan::{Batch, Plan};
use crate::retry::Backoff;
use crate::sink::{
    has_patterns, identity, take_patterns, ApplySink, ApplyStats, RetryClass, SinkError,
    SinkObserver,
};
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

/// Runs `plan` (or, with `None`, only the identity check when one is due)
/// until the sink confirms it: before it, when `verify_identity` is set, the
/// Redis identity is verified (guarantee 6); any error sets it again and is
/// retried after a backoff, a fatal one is returned.
async fn apply_retrying<S: ApplySink>(
    sink: &mut S,
    plan: Option<&Plan>,
    guard: &IdentityGuard,
    verify_identity: &mut bool,
    observer: &mut dyn SinkObserver,
) -> Result<ApplyStats, SinkError> {
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            if *verify_identity {
                ensure_identity(sink, guard, observer).await?;
            }
            match plan {
                Some(plan) if !plan.is_empty() => sink.apply(plan).await,
                _ => Ok(ApplyStats::default()),
            }
        };
        match attempt.await {
            Ok(stats) => {
                *verify_identity = false;
                return Ok(stats);
            }
            Err(err) if err.retry_class() == RetryClass::Fatal => return Err(err),
            Err(err) => {
                *verify_identity = true;
                let delay = backoff.next_delay();
                observer.failed(&err, delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Applies batches in order, retrying each until Redis confirms it, then
/// acknowledges. Returns when the batch channel closed and every pattern pass
/// finished, or with the error when it is fatal. Before the first batch and
/// after any Redis error, the Redis identity is verified (guarantee 6). Before
/// a batch is applied, `gate` waits until its transactions are visible on the
/// primary and replayed by the listed replicas (guarantee 9); nothing later is
/// applied or acknowledged meanwhile, and the stream keeps its status updates.
///
/// A batch's pattern part (and, when it has one, its messages) goes to the
/// pattern lane ([`super::pattern_lane`]) once the gate passed and its
/// immediate part was applied; later batches keep flowing while the pass
/// runs. Acknowledgements stay in commit order through an [`AckQueue`].
pub async fn sink_stage<S: ApplySink + Clone + 'static>(
    mut batches: mpsc::Receiver<Batch>,
    sink: &mut S,
    ack: &mut Acknowledger,
    guard: &IdentityGuard,
    gate: &mut VisibilityGate,
    observer: &mut dyn SinkObserver,
) -> Result<(), SinkError> {
    let mut verify_identity = true;
    let mut lane = PatternLane::spawn(sink.clone());
    let mut queue = AckQueue::new();
    let mut taking = true;
    loop {
        tokio::select! {
            biased;
            // A pattern pass reported: a finished one releases acknowledgements.
            event = lane.events.recv() => {
                let Some(event) = event else {
                    // Closed after `close` and the last pass: drained.
                    break;
                };
                let release = match event {
                    LaneEvent::Started { patterns } => {
                        observer.pattern_pass_started(patterns);
                        None
                    }
                    LaneEvent::Failed { error, retry_in } => {
                        verify_identity = true;
                        observer.failed(&error, retry_in);
                        None
                    }
                    LaneEvent::Done { through, report } => {
                        observer.pattern_pass_finished(&report);
                        queue.done(through)
                    }
                    LaneEvent::Fatal(error) => return Err(error),
                };
                if let Some(lsn) = release {
                    // After a Redis error, nothing is acknowledged before the
                    // identity was verified again.
                    if verify_identity {
                        apply_retrying(sink, None, guard, &mut verify_identity, observer).await?;
                    }
                    if ack.confirm(lsn) {
                        observer.acknowledged(lsn);
                    }
                }
            }
            // The next batch, unless too many patterns wait for a pass.
            batch = batches.recv(), if taking && queue.waiting_patterns() <= MAX_WAITING_PATTERNS => {
                let Some(mut batch) = batch else {
                    // Drain: the lane finishes its passes, then closes.
                    taking = false;
                    lane.close();
                    continue;
                };
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
                let pattern_part = take_pattern_part(&mut batch.plan);
                let stats = apply_retrying(
                    sink,
                    Some(&batch.plan),
                    guard,
                    &mut verify_identity,
                    observer,
                )
                .await?;
                observer.applied(&batch, &stats, started.elapsed());
                if let Some(part) = pattern_part {
                    let seq = queue.submit(part.ops());
                    lane.submit(seq, part.clone());
                    // The whole plan again, for the gate's re-application.
                    batch.plan.merge(part);
                }
                gate.applied(passed, &batch);
                if batch.transactions > 0 {
                    // A transaction applied in Redis (its pattern part perhaps
                    // still running) and not yet acknowledged.
                    failpoint(AFTER_APPLY_BEFORE_ACK);
                }
                if let Some(lsn) = batch.ack.and_then(|lsn| queue.push(lsn)) {
                    if ack.confirm(lsn) {
                        observer.acknowledged(lsn);
                    }
                }
            }
            else => break,
        }
    }
    Ok(())
}

/// Moves the pattern part out of `plan`: its patterns and, when it has any,
/// its messages (published after the pass: a subscriber re-reading on a
/// message must not find a key a pending pattern still has to delete).
/// `None` when the plan has no pattern.
fn take_pattern_part(plan: &mut Plan) -> Option<Plan> {
    if !has_patterns(plan) {
        return None;
    }
    let mut part = take_patterns(plan);
    part.publish = std::mem::take(&mut plan.publish);
    part.publish_seen = std::mem::take(&mut plan.publish_seen);
    Some(part)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::lsn::Lsn;
    use crate::sink::MemorySink;
    use crate::worker::tests::{spawn_sink_stage, SinkTask};

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

    // The pattern lane, through the stage: a held pass does not hold up later
    // batches, acknowledgements stay in commit order, passes coalesce, and a
    // stop drains the lane.

    fn batch(key: &str, pattern: Option<&str>, publish: bool, ack: u64) -> Batch {
        let mut plan = Plan::default();
        plan.keys.insert(key);
        if let Some(p) = pattern {
            plan.patterns.insert(p);
        }
        if publish {
            plan.add_publish(crate::plan::Publish {
                channel: "c".into(),
                message: key.into(),
            });
        }
        Batch {
            plan,
            ack: Some(Lsn(ack)),
            transactions: 1,
            changes: 1,
            ..Batch::default()
        }
    }

    /// Starts the stage on a sink whose identity is stored (no flush), with
    /// pattern passes held. Returns the batch sender, the acknowledged LSN and
    /// the stage's task.
    async fn lane_stage(
        sink: &MemorySink,
    ) -> (
        mpsc::Sender<Batch>,
        tokio::sync::watch::Receiver<Lsn>,
        SinkTask<Flushes>,
    ) {
        let guard = guard(1, false);
        let stored = identity::Identity {
            redis_run_id: "memory-1".into(),
            pg_system_id: "7412".into(),
            pg_timeline: 1,
        };
        sink.store_identity(&guard.key, &stored).await.unwrap();
        sink.hold_passes();
        spawn_sink_stage(sink, guard, Flushes::default())
    }

    /// Waits (up to 10 s) until `cond` holds for the sink.
    async fn until(sink: &MemorySink, what: &str, cond: impl Fn(&[Plan]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond(&sink.applied()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                sink.applied()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn has_key(plans: &[Plan], key: &str) -> bool {
        plans.iter().any(|p| p.keys.contains(key))
    }

    fn passes(plans: &[Plan]) -> Vec<Vec<String>> {
        plans
            .iter()
            .filter(|p| !p.patterns.is_empty())
            .map(|p| {
                let mut v: Vec<String> = p.patterns.iter().map(str::to_owned).collect();
                v.sort();
                v
            })
            .collect()
    }

    #[tokio::test]
    async fn a_pass_in_flight_does_not_hold_up_later_batches_and_acks_wait_for_it() {
        let sink = MemorySink::new();
        let (tx, acked, task) = lane_stage(&sink).await;
        tx.send(batch("a", Some("post:1:*"), true, 10))
            .await
            .unwrap();
        tx.send(batch("b", None, true, 20)).await.unwrap();
        // b's keys and its message go out while a's pass is held...
        until(&sink, "b applied", |p| has_key(p, "b")).await;
        let applied = sink.applied();
        let b = applied.iter().find(|p| p.keys.contains("b")).unwrap();
        assert_eq!(b.publish.len(), 1, "a plain batch publishes at once");
        let a = applied.iter().find(|p| p.keys.contains("a")).unwrap();
        assert!(
            a.patterns.is_empty() && a.publish.is_empty(),
            "a's patterns and message wait for its pass: {a:?}"
        );
        assert!(passes(&applied).is_empty());
        // ...and nothing is acknowledged: a's pass is not done, b comes after a.
        assert_eq!(*acked.borrow(), Lsn::ZERO);
        assert_eq!(sink.waiting(), 1, "a's pass waits");

        sink.release_passes();
        until(&sink, "a's pass", |p| !passes(p).is_empty()).await;
        let mut acked = acked;
        tokio::time::timeout(Duration::from_secs(10), acked.wait_for(|l| *l == Lsn(20)))
            .await
            .expect("acknowledged through b after a's pass")
            .unwrap();
        let pass = sink
            .applied()
            .into_iter()
            .find(|p| !p.patterns.is_empty())
            .unwrap();
        assert_eq!(
            pass.publish.len(),
            1,
            "a's message is published with its pass"
        );
        assert!(pass.keys.is_empty());
        drop(tx);
        task.await.unwrap().0.unwrap();
    }

    #[tokio::test]
    async fn patterns_arriving_during_a_pass_are_coalesced_into_the_next() {
        let sink = MemorySink::new();
        let (tx, acked, task) = lane_stage(&sink).await;
        tx.send(batch("a", Some("a:*"), false, 10)).await.unwrap();
        until(&sink, "a applied", |p| has_key(p, "a")).await;
        tx.send(batch("b", Some("b:*"), false, 20)).await.unwrap();
        tx.send(batch("c", None, false, 30)).await.unwrap();
        tx.send(batch("d", Some("d:*"), false, 40)).await.unwrap();
        until(&sink, "d applied", |p| has_key(p, "d")).await;
        assert_eq!(*acked.borrow(), Lsn::ZERO);
        sink.release_passes();
        drop(tx);
        // The stop drains the lane: the stage returns once every pass is done.
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the stage drained")
            .unwrap()
            .0
            .unwrap();
        assert_eq!(*acked.borrow(), Lsn(40));
        assert_eq!(
            passes(&sink.applied()),
            vec![
                vec!["a:*".to_owned()],
                vec!["b:*".to_owned(), "d:*".to_owned()]
            ],
            "b's and d's patterns arrived during a's pass: one pass for both"
        );
    }
}
