//! The plan stage: decodes the source's items, folds their changes into a
//! [`Batch`] through the [`Planner`], decides what each batch acknowledges and
//! hands closed batches to the sink stage.
//!
//! Its one `biased` `select!` is the stage's whole schedule; its priorities are
//! written next to its arms. The place a batch's acknowledgement is decided is
//! described in ARCHITECTURE.md, "The acknowledgement rule".

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::ack::AckRule;
use crate::decode::relations::RelationCache;
use crate::decode::Event;
use crate::log_fields::{COLUMN, COUNT, LSN, REASON, TABLE};
use crate::lsn::Lsn;
use crate::plan::planner::Planner;
use crate::plan::Batch;
use crate::shutdown::Shutdown;
use crate::source::SourceItem;
use crate::telemetry::Telemetry;

/// How often the plan stage reports liveness while idle.
const TICK: Duration = Duration::from_secs(5);

/// Source items the plan stage folds in a row before it looks at its other
/// inputs (shutdown, liveness, a ready batch) again.
const DRAIN_MAX: usize = 256;

/// Batching limits, from `[worker]`.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// A batch closes this long after its first change at the latest.
    pub max_delay: Duration,
    /// A batch closes when its plan holds this many operations.
    pub max_ops: usize,
}

/// Why the pipeline stopped on the planning side.
#[derive(Debug, thiserror::Error)]
pub enum PlanStageError {
    /// The stream held bytes the decoder cannot accept.
    #[error(transparent)]
    Decode(#[from] crate::decode::pgoutput::DecodeError),
}

/// Decodes source items, folds them into batches and hands closed batches to
/// the sink stage. Returns when the source channel closes (after sending the
/// last batch), or on a decode error (after sending what completed before it).
pub async fn plan_stage(
    mut source: mpsc::Receiver<SourceItem>,
    batches: mpsc::Sender<Batch>,
    planner: &mut Planner,
    limits: BatchLimits,
    mut stop: Shutdown,
    telemetry: &Telemetry,
) -> Result<(), PlanStageError> {
    let mut relations = RelationCache::new();
    let mut table_names: HashMap<u32, String> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    let mut events = Vec::with_capacity(4);
    let mut batch = Batch::default();
    let mut opened: Option<Instant> = None;
    let mut rule = AckRule::new();
    let mut stopping = false;
    // The open transaction's xid and commit LSN: a batch closed in its middle
    // hands them to the next one (guarantee 9 waits for them per batch).
    let mut open: Option<(u32, Lsn)> = None;
    // The batch should go as soon as the sink stage can take it. While the
    // sink is busy, changes keep folding into the batch (bigger batches, more
    // dedup, fewer round trips); a full batch waits and backpressure builds.
    let mut ready = false;
    let delay = tokio::time::sleep(limits.max_delay);
    tokio::pin!(delay);
    loop {
        let has_work = batch_has_work(&batch, &rule, planner);
        if !has_work {
            ready = false;
            opened = None;
        }
        let full = planner.plan().ops() >= limits.max_ops;
        let item = tokio::select! {
            biased;
            // 0. Shutdown: take nothing new, drain what the channel holds.
            () = stop.requested(), if !stopping => {
                stopping = true;
                source.close();
                continue;
            }
            // 1. Liveness and the heartbeat watchdog, even while idle.
            _ = tick.tick() => {
                telemetry.touch();
                telemetry.heartbeat_tick();
                continue;
            }
            // 2. A ready batch and room in the sink stage: hand it over.
            permit = batches.reserve(), if ready && has_work => {
                match permit {
                    Ok(permit) => permit.send(close_batch(&mut batch, &mut rule, planner, open, telemetry)),
                    // The sink stage ended (fatal error or shutdown): nothing
                    // more is acknowledged; PostgreSQL resends the rest.
                    Err(_) => return Ok(()),
                }
                ready = false;
                opened = None;
                continue;
            }
            // 3. The batch's delay elapsed: it is ready.
            () = &mut delay, if opened.is_some() && !ready => {
                ready = true;
                continue;
            }
            // 4. More data, while the batch has room.
            item = source.recv(), if !full => match item {
                Some(item) => item,
                None => {
                    flush(&mut batch, &mut rule, planner, open, &batches, telemetry).await;
                    return Ok(());
                }
            },
        };
        // Fold what the channel already holds without going back through the
        // select above (most of the plan stage's own cost per message), up to
        // DRAIN_MAX items or a full batch.
        let mut item = item;
        let mut drained = 0;
        loop {
            match item {
                SourceItem::XLogData {
                    wal_start,
                    wal_end,
                    data,
                } => {
                    telemetry.wal_end(wal_end);
                    events.clear();
                    if let Err(err) = relations.decode_shared(&data, wal_start, &mut events) {
                        flush(&mut batch, &mut rule, planner, open, &batches, telemetry).await;
                        return Err(err.into());
                    }
                    for event in events.drain(..) {
                        match &event {
                            Event::Begin { xid, final_lsn, .. } => {
                                open = Some((*xid, *final_lsn));
                                batch.xids.push(*xid);
                                batch.last_commit_lsn = Some(
                                    batch
                                        .last_commit_lsn
                                        .map_or(*final_lsn, |l| l.max(*final_lsn)),
                                );
                            }
                            Event::Change(change) => {
                                batch.changes += 1;
                                let table = table_names
                                    .entry(change.relation.oid)
                                    .or_insert_with(|| change.relation.qualified_name());
                                telemetry.change(table, change.op);
                                if change.op == crate::decode::Op::Truncate {
                                    telemetry
                                        .metrics
                                        .flush(crate::metrics::FlushReason::Truncate);
                                }
                            }
                            Event::Relation(rel) => {
                                table_names.insert(rel.oid, rel.qualified_name());
                            }
                            Event::Commit { commit_time, .. } => {
                                open = None;
                                batch.transactions += 1;
                                batch.first_commit_time.get_or_insert(*commit_time);
                            }
                            _ => {}
                        }
                        rule.event(&event);
                        if let Event::Message {
                            prefix,
                            content,
                            lsn,
                            ..
                        } = &event
                        {
                            observe_message(prefix, content, *lsn, telemetry);
                        }
                        planner.feed(&event);
                        if matches!(event, Event::Relation(_)) {
                            telemetry.renamed(&planner.stats().renamed);
                            telemetry.missing_columns(planner.missing_columns());
                        }
                        relations.recycle(event);
                    }
                }
                SourceItem::Keepalive { wal_end } => {
                    telemetry.wal_end(wal_end);
                    rule.keepalive(wal_end);
                }
                // Changes were skipped right here: flushing every mapped table
                // in this batch covers them before anything after them is
                // acknowledged (the rule moves nothing for it).
                SourceItem::PublicationSkipped { publication } => {
                    telemetry.publication_skipped(&publication);
                    planner.flush_all();
                }
            }
            drained += 1;
            if drained >= DRAIN_MAX || planner.plan().ops() >= limits.max_ops {
                break;
            }
            match source.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if opened.is_none() && batch_has_work(&batch, &rule, planner) {
            opened = Some(Instant::now());
            delay
                .as_mut()
                .reset((Instant::now() + limits.max_delay).into());
        }
        if planner.plan().ops() >= limits.max_ops || source.is_empty() {
            ready = true;
        }
    }
}

/// Our own logical messages: heartbeats measure lag; flush markers are logged
/// and counted (the planner fires their invalidations).
fn observe_message(prefix: &str, content: &[u8], lsn: Lsn, telemetry: &Telemetry) {
    if prefix != crate::plan::planner::MESSAGE_PREFIX {
        return;
    }
    if content == crate::telemetry::HEARTBEAT {
        telemetry.heartbeat_returned(lsn);
    } else if content.starts_with(b"flush:") {
        telemetry.flush_marker(content == b"flush:all");
        tracing::warn!(
            { LSN } = %lsn,
            marker = %String::from_utf8_lossy(content),
            "flush marker: firing the truncate invalidations of the tables it names"
        );
    }
}

/// Whether the batch being built has anything to apply or acknowledge.
fn batch_has_work(batch: &Batch, rule: &AckRule, planner: &Planner) -> bool {
    !batch.is_idle() || rule.pending().is_some() || planner.plan().ops() > 0
}

/// Sends what is left at the end of the stream (or before a decode error).
async fn flush(
    batch: &mut Batch,
    rule: &mut AckRule,
    planner: &mut Planner,
    open: Option<(u32, Lsn)>,
    batches: &mpsc::Sender<Batch>,
    telemetry: &Telemetry,
) {
    let out = close_batch(batch, rule, planner, open, telemetry);
    if out.is_idle() {
        return;
    }
    // The sink stage ends only on shutdown or a fatal error; then this batch
    // is not acknowledged and PostgreSQL sends it again after a restart.
    let _ = batches.send(out).await;
}

/// Takes the batch and the planner's plan, logging and counting fallbacks.
/// A transaction still open (`open`: its xid and commit LSN) continues in
/// the next batch, which must wait for it too.
fn close_batch(
    batch: &mut Batch,
    rule: &mut AckRule,
    planner: &mut Planner,
    open: Option<(u32, Lsn)>,
    telemetry: &Telemetry,
) -> Batch {
    let mut out = std::mem::take(batch);
    out.ack = rule.take();
    if let Some((xid, commit_lsn)) = open {
        batch.xids.push(xid);
        batch.last_commit_lsn = Some(commit_lsn);
    }
    out.plan = planner.take();
    telemetry.declared(&planner.take_declared());
    for m in planner.take_malformed() {
        tracing::error!(
            { LSN } = %m.lsn,
            error = %m.error,
            "a cache-invalidator message could not be understood: flushed every mapped table instead of guessing what it meant"
        );
    }
    for fallback in planner.take_fallbacks() {
        telemetry.fallback(&fallback.table, fallback.reason, fallback.count);
        if fallback.reason.is_refresh() {
            tracing::warn!(
                { TABLE } = %fallback.table,
                { REASON } = fallback.reason.as_str(),
                { COLUMN } = fallback.column.as_deref().unwrap_or(""),
                { COUNT } = fallback.count,
                "a refreshed value could not be rendered (unknown or too large): unlinked its key instead"
            );
            continue;
        }
        tracing::warn!(
            { TABLE } = %fallback.table,
            { REASON } = fallback.reason.as_str(),
            { COLUMN } = fallback.column.as_deref().unwrap_or(""),
            { COUNT } = fallback.count,
            "a value needed by a mapping was unknown: fired the table's truncate invalidations instead"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};
    use std::sync::Arc;

    fn begin(xid: u32, final_lsn: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(final_lsn);
        b.put_i64(0);
        b.put_u32(xid);
        b.freeze()
    }

    fn relation() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(7);
        b.put_slice(b"public\0items\0");
        b.put_u8(b'd');
        b.put_i16(1);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.freeze()
    }

    fn insert(id: &str) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(7);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(i32::try_from(id.len()).unwrap());
        b.put_slice(id.as_bytes());
        b.freeze()
    }

    fn commit(commit_lsn: u64, end_lsn: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(commit_lsn);
        b.put_u64(end_lsn);
        b.put_i64(0);
        b.freeze()
    }

    /// Guarantee 9 needs every batch to name the transactions it has work
    /// for: a large transaction cut into several batches is applied chunk by
    /// chunk before its Commit arrives, so each chunk carries its xid and its
    /// commit LSN (known from the Begin).
    #[tokio::test]
    async fn every_batch_carries_the_xids_and_commit_lsn_of_its_transactions() {
        let mappings = Arc::new(
            crate::map::Mappings::parse(
                "t.toml",
                "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
            )
            .unwrap(),
        );
        let mut planner = Planner::new(mappings, crate::plan::PlannerContext::default());
        let telemetry = Telemetry::new();
        let (src_tx, src_rx) = mpsc::channel(64);
        let (batch_tx, mut batch_rx) = mpsc::channel(64);
        let (_stop_tx, stop_rx) = crate::shutdown::ShutdownTrigger::new();
        let messages = [
            (10, relation()),
            (10, begin(700, 0x500)),
            (11, insert("1")),
            (12, insert("2")),
            (13, insert("3")),
            (14, commit(0x500, 0x510)),
            (20, begin(701, 0x600)),
            (21, insert("4")),
            (22, commit(0x600, 0x610)),
        ];
        for (lsn, data) in messages {
            src_tx
                .send(SourceItem::XLogData {
                    wal_start: Lsn(lsn),
                    wal_end: Lsn(lsn),
                    data,
                })
                .await
                .unwrap();
        }
        drop(src_tx);
        let limits = BatchLimits {
            max_delay: Duration::from_millis(1),
            max_ops: 1,
        };
        plan_stage(src_rx, batch_tx, &mut planner, limits, stop_rx, &telemetry)
            .await
            .unwrap();
        let mut batches = Vec::new();
        while let Ok(b) = batch_rx.try_recv() {
            batches.push(b);
        }
        let with_work: Vec<&Batch> = batches.iter().filter(|b| !b.plan.is_empty()).collect();
        assert_eq!(with_work.len(), 4, "one change per batch: {batches:?}");
        for b in &with_work {
            let keys: Vec<String> = b.plan.keys.iter().map(str::to_owned).collect();
            let key = &keys[0];
            let (xid, lsn) = if key == "item:4" {
                (701, 0x600)
            } else {
                (700, 0x500)
            };
            assert!(
                b.xids.contains(&xid),
                "{key}: batch without its xid {xid}: {b:?}"
            );
            assert!(
                b.last_commit_lsn >= Some(Lsn(lsn)),
                "{key}: batch without its commit LSN: {b:?}"
            );
        }
        // The chunks of transaction 700 before its Commit acknowledge nothing.
        let first = with_work[0];
        assert_eq!(first.plan.keys.iter().collect::<Vec<_>>(), ["item:1"]);
        assert_eq!(first.ack, None);
    }
}
