//! The pattern lane: pattern passes run beside the sink stage, so a SCAN
//! over a large keyspace never holds up the key, tag, version and channel
//! invalidations of later batches (ARCHITECTURE.md, "Patterns").
//!
//! ```text
//!  sink stage ──(seq, pattern part)──▶ lane task: coalesce, one pass at a time
//!      ▲                                   │
//!      └────── Done { through: seq } ◀─────┘
//! ```
//!
//! The sink stage splits each batch (after its visibility wait) into its
//! immediate part, applied at once, and its pattern part, submitted here with
//! the next sequence number. The lane runs one pass at a time; every part
//! submitted while a pass runs is merged into the next pass. A batch whose
//! pattern part carries messages (`channels`) publishes them after its pass:
//! a subscriber that re-reads after a message never finds a key a pending
//! pattern still has to delete.
//!
//! Acknowledgement stays in commit order through [`AckQueue`]: each batch
//! waits for the latest submission made up to and including itself, so its
//! LSN is confirmed only after its own pattern part and every earlier one are
//! done, and after every earlier batch's acknowledgement. A crash mid-pass
//! leaves those transactions unacknowledged: PostgreSQL sends them again and
//! the pass runs again.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::lsn::Lsn;
use crate::plan::Plan;
use crate::retry::Backoff;
use crate::sink::{ApplySink, PassReport, RetryClass, SinkError};

/// The sink stage stops taking batches while more patterns than this wait
/// for a pass (backpressure reaches the replication socket): the lane's
/// memory stays bounded however slow a pass is.
pub const MAX_WAITING_PATTERNS: usize = 100_000;

/// What the lane tells the sink stage.
#[derive(Debug)]
pub enum LaneEvent {
    /// A pass started over this many patterns.
    Started {
        /// Patterns in the pass.
        patterns: u64,
    },
    /// A pass attempt failed; it is retried after `retry_in`.
    Failed {
        /// Why.
        error: SinkError,
        /// When the pass is tried again.
        retry_in: std::time::Duration,
    },
    /// A pass finished: every submission up to `through` is done.
    Done {
        /// The highest submission sequence number the pass covered.
        through: u64,
        /// What the pass did.
        report: PassReport,
    },
    /// A pass failed with an error that retrying cannot fix; the lane stopped.
    Fatal(SinkError),
}

/// Acknowledgements waiting for pattern passes, in commit order. Pure: the
/// sink stage feeds it and its unit tests drive it alone.
///
/// Each entry is (required submission, LSN): the LSN may be confirmed once
/// every submission up to the required one is done. Required submissions only
/// grow along the queue, so entries with the same requirement merge and the
/// queue holds at most one entry per outstanding submission.
#[derive(Debug, Default)]
pub struct AckQueue {
    entries: VecDeque<(u64, Lsn)>,
    /// Submissions made so far (the last sequence number handed out).
    submitted: u64,
    /// Every submission up to here is done.
    done: u64,
    /// (sequence number, pattern count) of submissions not yet done.
    waiting: VecDeque<(u64, usize)>,
    waiting_patterns: usize,
}

impl AckQueue {
    /// Nothing submitted, nothing waiting.
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch's pattern part of `patterns` patterns is submitted: returns its
    /// sequence number.
    pub fn submit(&mut self, patterns: usize) -> u64 {
        self.submitted += 1;
        self.waiting.push_back((self.submitted, patterns));
        self.waiting_patterns += patterns;
        self.submitted
    }

    /// A batch (its immediate part applied, its pattern part submitted if it
    /// had one) acknowledges `lsn`: returns `lsn` when nothing before it
    /// waits for a pass, else queues it and returns `None`.
    pub fn push(&mut self, lsn: Lsn) -> Option<Lsn> {
        if self.entries.is_empty() && self.done >= self.submitted {
            return Some(lsn);
        }
        match self.entries.back_mut() {
            Some((required, at)) if *required == self.submitted => *at = (*at).max(lsn),
            _ => self.entries.push_back((self.submitted, lsn)),
        }
        None
    }

    /// Every submission up to `through` is done: returns the highest LSN
    /// that may now be confirmed, if any.
    pub fn done(&mut self, through: u64) -> Option<Lsn> {
        self.done = self.done.max(through);
        while let Some(&(seq, n)) = self.waiting.front() {
            if seq > self.done {
                break;
            }
            self.waiting.pop_front();
            self.waiting_patterns -= n;
        }
        let mut release = None;
        while let Some(&(required, lsn)) = self.entries.front() {
            if required > self.done {
                break;
            }
            self.entries.pop_front();
            release = Some(lsn);
        }
        release
    }

    /// Whether any submission is not yet done.
    pub fn passes_pending(&self) -> bool {
        self.done < self.submitted
    }

    /// Patterns submitted and not yet done.
    pub fn waiting_patterns(&self) -> usize {
        self.waiting_patterns
    }

    /// Acknowledgements waiting for a pass.
    pub fn queued(&self) -> usize {
        self.entries.len()
    }
}

/// The sink stage's handle on the lane task: submissions go in, events come
/// out. Dropping it aborts the task (a stop past its grace period).
pub struct PatternLane {
    work: Option<mpsc::UnboundedSender<(u64, Plan)>>,
    /// Events from the lane task, in order.
    pub events: mpsc::UnboundedReceiver<LaneEvent>,
    task: JoinHandle<()>,
}

impl PatternLane {
    /// Starts the lane task on its own handle of the sink.
    pub fn spawn<S: ApplySink + 'static>(sink: S) -> Self {
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(lane(sink, work_rx, events_tx));
        PatternLane {
            work: Some(work_tx),
            events: events_rx,
            task,
        }
    }

    /// Hands a pattern part to the lane under sequence number `seq`.
    pub fn submit(&self, seq: u64, plan: Plan) {
        if let Some(work) = &self.work {
            // A closed lane has sent (or will send) its Fatal event.
            let _ = work.send((seq, plan));
        }
    }

    /// No more submissions: the lane finishes what it has, then its event
    /// channel closes.
    pub fn close(&mut self) {
        self.work = None;
    }
}

impl Drop for PatternLane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The lane task: waits for work, merges everything already submitted into
/// one plan, runs its pass (retrying until it succeeds or fails fatally),
/// reports, and starts over.
async fn lane<S: ApplySink>(
    mut sink: S,
    mut work: mpsc::UnboundedReceiver<(u64, Plan)>,
    events: mpsc::UnboundedSender<LaneEvent>,
) {
    while let Some((mut through, mut plan)) = work.recv().await {
        while let Ok((seq, more)) = work.try_recv() {
            through = through.max(seq);
            plan.merge(more);
        }
        let patterns =
            (plan.patterns.len() + plan.tag_patterns.len() + plan.version_patterns.len()) as u64;
        let _ = events.send(LaneEvent::Started { patterns });
        let started = Instant::now();
        let mut backoff = Backoff::new();
        let stats = loop {
            match sink.apply(&plan).await {
                Ok(stats) => break stats,
                Err(error) if error.retry_class() == RetryClass::Fatal => {
                    let _ = events.send(LaneEvent::Fatal(error));
                    return;
                }
                Err(error) => {
                    let retry_in = backoff.next_delay();
                    let _ = events.send(LaneEvent::Failed { error, retry_in });
                    tokio::time::sleep(retry_in).await;
                }
            }
        };
        let report = PassReport {
            patterns,
            scanned: stats.scanned,
            matched: stats.pattern_matches,
            elapsed: started.elapsed(),
        };
        if events.send(LaneEvent::Done { through, report }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_pending_acknowledges_at_once() {
        let mut q = AckQueue::new();
        assert_eq!(q.push(Lsn(10)), Some(Lsn(10)));
        let s = q.submit(1);
        assert_eq!(q.done(s), None);
        assert_eq!(q.push(Lsn(20)), Some(Lsn(20)));
        assert!(!q.passes_pending());
    }

    #[test]
    fn later_batches_wait_for_an_earlier_pass() {
        let mut q = AckQueue::new();
        let a = q.submit(2);
        assert_eq!(q.push(Lsn(10)), None, "its own pass is pending");
        assert_eq!(q.push(Lsn(20)), None, "a later plain batch waits behind it");
        let b = q.submit(3);
        assert_eq!(q.push(Lsn(30)), None);
        assert_eq!(q.push(Lsn(40)), None);
        assert_eq!(q.waiting_patterns(), 5);
        assert_eq!(q.queued(), 2, "one entry per outstanding submission");
        assert_eq!(q.done(a), Some(Lsn(20)));
        assert_eq!(q.waiting_patterns(), 3);
        assert!(q.passes_pending());
        assert_eq!(q.done(b), Some(Lsn(40)));
        assert_eq!(q.queued(), 0);
        assert_eq!(q.push(Lsn(50)), Some(Lsn(50)));
    }

    #[test]
    fn a_coalesced_pass_releases_everything_it_covered() {
        let mut q = AckQueue::new();
        let _a = q.submit(1);
        assert_eq!(q.push(Lsn(10)), None);
        let _b = q.submit(1);
        assert_eq!(q.push(Lsn(20)), None);
        let c = q.submit(1);
        assert_eq!(q.push(Lsn(30)), None);
        assert_eq!(q.done(c), Some(Lsn(30)));
        assert_eq!(q.done(c), None, "released once");
    }

    proptest::proptest! {
        /// Whatever the interleaving of batches and pass completions, what is
        /// released is exactly the highest LSN of the batches whose own and
        /// earlier passes are all done, and it only moves forward.
        #[test]
        fn releases_in_commit_order(ops in proptest::collection::vec((0u8..3, 1u64..4), 1..200)) {
            let mut q = AckQueue::new();
            // (lsn, required submission) of every batch, in order.
            let mut batches: Vec<(u64, u64)> = Vec::new();
            let mut released = 0u64;
            let mut done = 0u64;
            let mut lsn = 0u64;
            for (op, passes) in ops {
                match op {
                    0 | 1 => {
                        // 0: a batch with a pattern part, 1: without.
                        if op == 0 {
                            q.submit(1);
                        }
                        lsn += 10;
                        batches.push((lsn, q.submitted));
                        if let Some(l) = q.push(Lsn(lsn)) {
                            proptest::prop_assert!(l.0 > released);
                            released = l.0;
                        }
                    }
                    _ => {
                        // The lane finishes a pass covering up to `passes` more submissions.
                        done = q.submitted.min(done + passes);
                        if let Some(l) = q.done(done) {
                            proptest::prop_assert!(l.0 > released);
                            released = l.0;
                        }
                    }
                }
                let expected = batches
                    .iter()
                    .take_while(|(_, required)| *required <= done)
                    .map(|(l, _)| *l)
                    .max()
                    .unwrap_or(0);
                proptest::prop_assert_eq!(released, expected);
            }
        }
    }
}
