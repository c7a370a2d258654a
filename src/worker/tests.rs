//! Unit tests of the two stages, without servers: pgoutput bytes in (the
//! benches' generator), the in-memory sink out. Time is paused, so backoff and
//! batching delays pass instantly and "nothing happens any more" is observable.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{plan_stage, sink_stage, Batch, BatchLimits, IdentityGuard};
use crate::ack::Acknowledger;
use crate::lsn::Lsn;
use crate::map::Mappings;
use crate::plan::planner::Planner;
use crate::plan::{Plan, PlannerContext};
use crate::shutdown::ShutdownTrigger;
use crate::sink::{ApplySink, ApplyStats, MemorySink, RetryClass, SinkError, SinkObserver};
use crate::source::SourceItem;
use crate::telemetry::Telemetry;
use crate::visibility::VisibilityGate;

#[path = "../../benches/support/pgoutput_gen.rs"]
mod pgoutput_gen;

use pgoutput_gen::{begin, commit, items_relation, items_update};

const MAPPING: &str = r#"
[[table]]
name = "items"
keys = ["item:{id}"]
"#;

fn planner() -> Planner {
    let mappings = Mappings::parse("items.toml", MAPPING).expect("mapping");
    Planner::new(Arc::new(mappings), PlannerContext::default())
}

fn data(at: u64, bytes: Vec<u8>) -> SourceItem {
    SourceItem::XLogData {
        wal_start: Lsn(at),
        wal_end: Lsn(at),
        data: Bytes::from(bytes),
    }
}

/// A transaction updating rows `ids` of `items`, committing with `end`.
fn transaction(end: u64, ids: &[u64]) -> Vec<SourceItem> {
    let mut out = vec![data(end - 0x30, begin(end - 0x10, 9))];
    for &id in ids {
        out.push(data(end - 0x20, items_update(id, 1, 1)));
    }
    out.push(data(end - 0x10, commit(end - 0x10, end)));
    out
}

fn keys(plan: &Plan) -> Vec<String> {
    let mut keys: Vec<String> = plan.keys.iter().map(str::to_string).collect();
    keys.sort();
    keys
}

const LIMITS: BatchLimits = BatchLimits {
    max_delay: Duration::from_millis(5),
    max_ops: 10_000,
};

/// The plan stage running on its own task, its batches collected by the test.
struct PlanStage {
    source: Option<mpsc::Sender<SourceItem>>,
    batches: mpsc::Receiver<Batch>,
    stop: Option<ShutdownTrigger>,
    task: tokio::task::JoinHandle<Result<(), super::PlanStageError>>,
}

/// Starts the plan stage with the relation already sent, then `items`.
async fn start_plan(
    limits: BatchLimits,
    source_capacity: usize,
    items: Vec<SourceItem>,
) -> PlanStage {
    let (source_tx, source_rx) = mpsc::channel(source_capacity);
    let (batch_tx, batches) = mpsc::channel(1);
    let (stop, stop_rx) = ShutdownTrigger::new();
    source_tx
        .send(data(0x100, items_relation("items")))
        .await
        .expect("room for the relation");
    for item in items {
        source_tx.send(item).await.expect("room for the items");
    }
    let task = tokio::spawn(async move {
        let telemetry = Telemetry::new();
        let mut planner = planner();
        plan_stage(
            source_rx,
            batch_tx,
            &mut planner,
            limits,
            stop_rx,
            &telemetry,
        )
        .await
    });
    PlanStage {
        source: Some(source_tx),
        batches,
        stop: Some(stop),
        task,
    }
}

/// The next batch within 10 s of (paused) time.
async fn next(batches: &mut mpsc::Receiver<Batch>) -> Batch {
    tokio::time::timeout(Duration::from_secs(10), batches.recv())
        .await
        .expect("a batch in time")
        .expect("the plan stage sent a batch")
}

#[tokio::test(start_paused = true)]
async fn transactions_waiting_together_fold_into_one_batch_acknowledging_the_last() {
    let mut items = transaction(0x1000, &[1, 2]);
    items.extend(transaction(0x2000, &[2, 3]));
    let mut stage = start_plan(LIMITS, 64, items).await;
    let batch = next(&mut stage.batches).await;
    assert_eq!(keys(&batch.plan), ["item:1", "item:2", "item:3"]);
    assert_eq!(batch.ack, Some(Lsn(0x2000)));
    assert_eq!(batch.transactions, 2);
    assert_eq!(batch.changes, 4);
}

#[tokio::test(start_paused = true)]
async fn a_transaction_larger_than_a_batch_is_acknowledged_by_its_last_chunk_only() {
    let limits = BatchLimits {
        max_ops: 2,
        ..LIMITS
    };
    let mut stage = start_plan(limits, 64, transaction(0x1000, &[1, 2, 3, 4, 5])).await;
    let mut acks = Vec::new();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let batch = next(&mut stage.batches).await;
        assert!(
            batch.plan.ops() <= 2,
            "a batch past max_ops: {}",
            batch.plan.ops()
        );
        seen.extend(keys(&batch.plan));
        acks.push(batch.ack);
    }
    let (last, chunks) = acks.split_last().expect("batches");
    assert!(
        chunks.iter().all(Option::is_none),
        "a chunk acknowledged: {acks:?}"
    );
    assert_eq!(
        *last,
        Some(Lsn(0x1000)),
        "the last chunk acknowledges the commit"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_keepalive_is_acknowledged_and_one_inside_a_transaction_is_not() {
    let mut stage = start_plan(
        LIMITS,
        64,
        vec![SourceItem::Keepalive {
            wal_end: Lsn(0x500),
        }],
    )
    .await;
    let batch = next(&mut stage.batches).await;
    assert!(batch.plan.is_empty());
    assert_eq!(batch.ack, Some(Lsn(0x500)), "idle advance");

    // Begin, then a keepalive past the transaction's end: nothing to acknowledge.
    let source = stage.source.as_ref().expect("source open");
    let mut tx = transaction(0x3000, &[7]);
    let commit = tx.pop().expect("commit");
    for item in tx {
        source.send(item).await.expect("send");
    }
    source
        .send(SourceItem::Keepalive {
            wal_end: Lsn(0x9000),
        })
        .await
        .expect("send");
    let batch = next(&mut stage.batches).await;
    assert_eq!(keys(&batch.plan), ["item:7"]);
    assert_eq!(
        batch.ack, None,
        "a keepalive inside a transaction acknowledged"
    );
    source.send(commit).await.expect("send");
    let batch = next(&mut stage.batches).await;
    assert_eq!(batch.ack, Some(Lsn(0x3000)));
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_stops_the_stage_reading_its_source() {
    // The sink takes nothing: one batch fits the channel, the next one fills
    // up to max_ops and waits; the stage must then leave the source alone.
    let limits = BatchLimits {
        max_ops: 2,
        ..LIMITS
    };
    let ids: Vec<u64> = (1..=50).collect();
    let stage = start_plan(limits, 128, transaction(0x1000, &ids)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let source = stage.source.as_ref().expect("source open");
    let unread = source.max_capacity() - source.capacity();
    assert!(
        unread > 40,
        "the stage kept reading with no room downstream: {unread} items left"
    );
    assert!(!stage.task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn on_stop_the_stage_drains_what_it_holds_and_ends() {
    // Two transactions wait in the source channel when the stop comes: the
    // stage stops taking new items but folds and sends what it holds.
    let items = transaction(0x1000, &[1])
        .into_iter()
        .chain(transaction(0x2000, &[2]));
    let mut stage = start_plan(LIMITS, 64, items.collect()).await;
    stage.stop.as_ref().expect("trigger").trigger();
    let mut acks = Vec::new();
    let mut all = Vec::new();
    while let Some(batch) = stage.batches.recv().await {
        all.extend(keys(&batch.plan));
        acks.extend(batch.ack);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), stage.task)
        .await
        .expect("the stage ended in time");
    ended.expect("no panic").expect("no error");
    all.sort();
    assert_eq!(all, ["item:1", "item:2"]);
    assert_eq!(acks.last(), Some(&Lsn(0x2000)));
    let source = stage.source.take().expect("source");
    assert!(
        source.is_closed(),
        "the stage still takes items after the stop"
    );
}

/// The stop signal's sender vanishing is a stop like any other: the stage
/// drains and ends (it used to spin on the closed channel instead).
#[tokio::test(start_paused = true)]
async fn a_dropped_trigger_is_a_stop() {
    let items = transaction(0x1000, &[1]);
    let mut stage = start_plan(LIMITS, 64, items).await;
    drop(stage.stop.take());
    let batch = next(&mut stage.batches).await;
    assert_eq!(batch.ack, Some(Lsn(0x1000)));
    let ended = tokio::time::timeout(Duration::from_secs(10), stage.task)
        .await
        .expect("the stage ended in time");
    ended.expect("no panic").expect("no error");
}

/// Records what the sink stage reports.
#[derive(Default)]
struct Recorder {
    events: Vec<String>,
}

impl SinkObserver for Recorder {
    fn applied(&mut self, batch: &Batch, _: &ApplyStats, _: Duration) {
        let ack = batch.ack.map_or("nothing".to_string(), |l| l.to_string());
        self.events.push(format!("applied {ack}"));
    }
    fn acknowledged(&mut self, lsn: Lsn) {
        self.events.push(format!("acknowledged {lsn}"));
    }
    fn failed(&mut self, err: &SinkError, _: Duration) {
        self.events.push(format!("failed {}", err.kind()));
    }
    fn flushed(&mut self, reason: &'static str) {
        self.events.push(format!("flushed {reason}"));
    }
}

fn guard() -> IdentityGuard {
    let mut flush_plan = Plan::default();
    flush_plan.patterns.insert("item:*");
    IdentityGuard {
        key: "cache-invalidator:s:identity".into(),
        pg_system_id: "42".into(),
        pg_timeline: 1,
        slot_synced: false,
        flush_plan,
        recheck: Arc::new(AtomicBool::new(false)),
    }
}

fn batch(key: &str, ack: u64) -> Batch {
    let mut plan = Plan::default();
    plan.keys.insert(key);
    Batch {
        plan,
        ack: Some(Lsn(ack)),
        transactions: 1,
        changes: 1,
        first_commit_time: None,
        ..Batch::default()
    }
}

/// The sink stage's task, giving back its result and its observer.
pub(super) type SinkTask<O> = tokio::task::JoinHandle<(Result<(), SinkError>, O)>;

/// Starts the sink stage on its own task over a clone of `sink` (visibility
/// gate off), reporting to `observer`. Returns the batch sender, the
/// acknowledged LSN and the task. `sink_stage`'s own tests use it too.
pub(super) fn spawn_sink_stage<O: SinkObserver + Send + 'static>(
    sink: &MemorySink,
    guard: IdentityGuard,
    mut observer: O,
) -> (mpsc::Sender<Batch>, watch::Receiver<Lsn>, SinkTask<O>) {
    let (batches, rx) = mpsc::channel(1);
    let (mut ack, acked) = Acknowledger::new(Lsn::ZERO);
    let mut sink = sink.clone();
    let task = tokio::spawn(async move {
        let mut gate = VisibilityGate::disabled();
        let result = sink_stage(rx, &mut sink, &mut ack, &guard, &mut gate, &mut observer).await;
        (result, observer)
    });
    (batches, acked, task)
}

/// The sink stage on its own task over a [`MemorySink`].
struct SinkStage {
    batches: mpsc::Sender<Batch>,
    acked: watch::Receiver<Lsn>,
    task: SinkTask<Recorder>,
}

fn start_sink(sink: &MemorySink, guard: IdentityGuard) -> SinkStage {
    let (batches, acked, task) = spawn_sink_stage(sink, guard, Recorder::default());
    SinkStage {
        batches,
        acked,
        task,
    }
}

impl SinkStage {
    /// Sends the stage a batch of one `key` acknowledging `ack`.
    async fn send(&self, key: &str, ack: u64) {
        self.batches
            .send(batch(key, ack))
            .await
            .expect("stage alive");
    }

    /// Waits (in paused time) until the stage acknowledged `ack`.
    async fn acknowledged(&self, what: &str, ack: u64) {
        until(what, || *self.acked.borrow() == Lsn(ack)).await;
    }
}

async fn finish(stage: SinkStage) -> (Result<(), SinkError>, Vec<String>) {
    drop(stage.batches);
    let (result, recorder) = tokio::time::timeout(Duration::from_secs(60), stage.task)
        .await
        .expect("the sink stage ended in time")
        .expect("no panic");
    (result, recorder.events)
}

/// Polls (in paused time) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test(start_paused = true)]
async fn first_batch_flushes_on_a_missing_identity_then_applies_and_acknowledges_in_order() {
    let sink = MemorySink::new();
    let stage = start_sink(&sink, guard());
    for (key, ack) in [("a", 10), ("b", 20), ("c", 30)] {
        stage.send(key, ack).await;
    }
    let acked = stage.acked.clone();
    let (result, events) = finish(stage).await;
    result.expect("no error");
    assert_eq!(*acked.borrow(), Lsn(30));
    let applied: Vec<Vec<String>> = sink.applied().iter().map(keys).collect();
    assert_eq!(applied.len(), 4, "{applied:?}");
    assert!(applied[0].is_empty(), "the flush plan has no keys");
    assert_eq!(applied[1..].concat(), ["a", "b", "c"]);
    assert_eq!(
        sink.applied()[0].patterns.iter().collect::<Vec<_>>(),
        ["item:*"],
        "the flush plan first"
    );
    assert_eq!(
        events,
        [
            "flushed identity_missing",
            "applied 0/A",
            "acknowledged 0/A",
            "applied 0/14",
            "acknowledged 0/14",
            "applied 0/1E",
            "acknowledged 0/1E",
        ]
    );
    assert!(sink.identity("cache-invalidator:s:identity").is_some());
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_and_nothing_is_acknowledged_before_the_batch_applied() {
    let sink = MemorySink::new();
    let mut stage = start_sink(&sink, guard());
    stage.send("a", 10).await;
    stage.acknowledged("first batch acknowledged", 10).await;

    // The second batch fails twice (back off), once more as blocked (NOPERM-like).
    sink.fail_next(2, RetryClass::BackOff);
    sink.fail_next(1, RetryClass::Blocked);
    sink.hold();
    stage.send("b", 20).await;
    until("the second batch is being applied", || sink.waiting() == 1).await;
    assert_eq!(*stage.acked.borrow_and_update(), Lsn(10));
    sink.release();
    stage.send("c", 30).await;
    stage.acknowledged("third batch acknowledged", 30).await;
    let (result, events) = finish(stage).await;
    result.expect("no error");
    // After a failure the identity is verified again before the retry; the
    // three failures hit apply, identity checks and apply again.
    let failures = events.iter().filter(|e| e.starts_with("failed")).count();
    assert_eq!(failures, 3, "{events:?}");
    let b_applied = events.iter().position(|e| e == "applied 0/14");
    let b_acked = events.iter().position(|e| e == "acknowledged 0/14");
    let last_failure = events.iter().rposition(|e| e.starts_with("failed"));
    assert!(
        last_failure < b_applied && b_applied < b_acked,
        "{events:?}"
    );
    let applied: Vec<Vec<String>> = sink.applied().iter().skip(1).map(keys).collect();
    assert_eq!(applied.concat(), ["a", "b", "c"], "{applied:?}");
}

#[tokio::test(start_paused = true)]
async fn a_fatal_error_ends_the_stage_without_acknowledging() {
    let sink = MemorySink::new();
    let stage = start_sink(&sink, guard());
    sink.fail_next(1, RetryClass::Fatal);
    stage.send("a", 10).await;
    let acked = stage.acked.clone();
    let (result, events) = finish(stage).await;
    let err = result.expect_err("a fatal error ends the stage");
    assert_eq!(err.retry_class(), RetryClass::Fatal);
    assert_eq!(*acked.borrow(), Lsn::ZERO);
    assert!(
        events.iter().all(|e| !e.starts_with("acknowledged")),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_changed_redis_after_an_outage_is_flushed_before_the_next_batch() {
    let sink = MemorySink::new();
    let guard = guard();
    let recheck = Arc::clone(&guard.recheck);
    let stage = start_sink(&sink, guard);
    stage.send("a", 10).await;
    stage.acknowledged("first batch acknowledged", 10).await;
    // The probe saw Redis unreachable; Redis came back as another server.
    sink.set_run_id("memory-2");
    recheck.store(true, std::sync::atomic::Ordering::Relaxed);
    stage.send("b", 20).await;
    let (result, events) = finish(stage).await;
    result.expect("no error");
    assert_eq!(
        events,
        [
            "flushed identity_missing",
            "applied 0/A",
            "acknowledged 0/A",
            "flushed identity_changed",
            "applied 0/14",
            "acknowledged 0/14",
        ]
    );
    let stored = sink
        .identity("cache-invalidator:s:identity")
        .expect("stored");
    assert_eq!(stored.redis_run_id, "memory-2");
}

/// Both stages joined as `run` joins them: acknowledgements follow the
/// commits, in order, and only after the sink applied them.
#[tokio::test(start_paused = true)]
async fn both_stages_acknowledge_each_commit_after_its_keys_were_applied() {
    let sink = MemorySink::new();
    let (source_tx, source_rx) = mpsc::channel(64);
    let (batch_tx, batch_rx) = mpsc::channel(1);
    let (_stop, stop_rx) = ShutdownTrigger::new();
    let (mut ack, mut acked) = Acknowledger::new(Lsn::ZERO);
    let pipeline = {
        let mut sink = sink.clone();
        tokio::spawn(async move {
            let telemetry = Telemetry::new();
            let mut planner = planner();
            let guard = guard();
            let mut recorder = Recorder::default();
            let plan = plan_stage(
                source_rx,
                batch_tx,
                &mut planner,
                LIMITS,
                stop_rx,
                &telemetry,
            );
            let mut gate = VisibilityGate::disabled();
            let apply = sink_stage(
                batch_rx,
                &mut sink,
                &mut ack,
                &guard,
                &mut gate,
                &mut recorder,
            );
            let (p, s) = tokio::join!(plan, apply);
            p.expect("plan stage");
            s.expect("sink stage");
        })
    };
    source_tx
        .send(data(0x100, items_relation("items")))
        .await
        .expect("send");
    for (i, end) in [0x1000u64, 0x2000, 0x3000].into_iter().enumerate() {
        sink.hold();
        for item in transaction(end, &[i as u64 + 1]) {
            source_tx.send(item).await.expect("send");
        }
        until("the batch reached the sink", || sink.waiting() == 1).await;
        assert!(
            *acked.borrow_and_update() < Lsn(end),
            "acknowledged before applied"
        );
        sink.release();
        until("acknowledged", || *acked.borrow() == Lsn(end)).await;
        let last = sink.applied().last().map(keys).unwrap_or_default();
        assert_eq!(last, [format!("item:{}", i + 1)]);
    }
    drop(source_tx);
    tokio::time::timeout(Duration::from_secs(10), pipeline)
        .await
        .expect("pipeline ended")
        .expect("no panic");
}

#[tokio::test]
async fn the_memory_sink_reports_identity_like_redis_would() {
    use crate::sink::identity::{Identity, IdentityCheck};
    let sink = MemorySink::new();
    let current = Identity {
        redis_run_id: sink.redis_run_id().await.expect("run id"),
        pg_system_id: "1".into(),
        pg_timeline: 1,
    };
    assert_eq!(
        sink.check_identity("k", &current).await.expect("check"),
        IdentityCheck::Missing
    );
    sink.store_identity("k", &current).await.expect("store");
    assert_eq!(
        sink.check_identity("k", &current).await.expect("check"),
        IdentityCheck::Unchanged
    );
    sink.set_run_id("other");
    let other = Identity {
        redis_run_id: sink.redis_run_id().await.expect("run id"),
        ..current
    };
    assert!(matches!(
        sink.check_identity("k", &other).await.expect("check"),
        IdentityCheck::Changed { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_skipped_publication_flushes_every_mapped_table_before_anything_after_it_is_acknowledged()
{
    let mut stage = start_plan(
        LIMITS,
        64,
        vec![
            SourceItem::PublicationSkipped {
                publication: "p".into(),
            },
            SourceItem::Keepalive {
                wal_end: Lsn(0x500),
            },
        ],
    )
    .await;
    let batch = next(&mut stage.batches).await;
    assert_eq!(batch.ack, Some(Lsn(0x500)));
    let patterns: Vec<&str> = batch.plan.patterns.iter().collect();
    assert_eq!(patterns, ["item:*"], "items' truncate invalidations");
}
