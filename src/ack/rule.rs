//! The acknowledgement rule: which WAL position a batch may acknowledge once
//! the sink applied it, decided item by item in stream order. Pure: no I/O, no
//! clock; the plan stage feeds it and its unit tests drive it alone.
//!
//! | item, in stream order | no transaction open | inside a transaction |
//! | --- | --- | --- |
//! | `Begin` | opens one; moves nothing | (cannot happen) |
//! | `Commit { end_lsn }` | (cannot happen) | closes it; pending = `end_lsn` |
//! | non-transactional message at `lsn` | pending = `lsn` | moves nothing |
//! | keepalive with `wal_end` | pending = `wal_end` (idle advance) | moves nothing |
//! | change, relation, transactional message (flush markers, declared invalidations) | moves nothing | moves nothing |
//!
//! "Pending" only moves forward (`max`). When the plan stage closes a batch it
//! [`take`](AckRule::take)s the pending position into the batch; the sink
//! stage confirms it after the batch (and, the stages being FIFO, every batch
//! before it) was applied. A transaction is acknowledged by its Commit only,
//! so a batch cut inside a large transaction acknowledges nothing of it, and
//! a keepalive or a message never acknowledges past a transaction that began
//! and has not committed. ARCHITECTURE.md, "The acknowledgement rule".

use crate::decode::Event;
use crate::lsn::Lsn;

/// The acknowledgement rule's state: whether a transaction is open, and the
/// position the next closed batch acknowledges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AckRule {
    in_transaction: bool,
    pending: Option<Lsn>,
}

impl AckRule {
    /// No transaction open, nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoded event, in stream order.
    pub fn event(&mut self, event: &Event) {
        match event {
            Event::Begin { .. } => self.in_transaction = true,
            Event::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.advance(*end_lsn);
            }
            Event::Message {
                transactional: false,
                lsn,
                ..
            } if !self.in_transaction => self.advance(*lsn),
            Event::Message { .. } | Event::Change(_) | Event::Relation(_) => {}
        }
    }

    /// A keepalive carrying the server's `wal_end`, in stream order: with no
    /// transaction open, everything before it is in this batch or an earlier
    /// one (idle slots do not pin WAL).
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if !self.in_transaction {
            self.advance(wal_end);
        }
    }

    /// Whether a Begin arrived without its Commit yet.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// What the batch being built would acknowledge if it closed now.
    pub fn pending(&self) -> Option<Lsn> {
        self.pending
    }

    /// Closes the batch: returns what it acknowledges and starts the next
    /// batch with nothing pending (an open transaction stays open).
    pub fn take(&mut self) -> Option<Lsn> {
        self.pending.take()
    }

    fn advance(&mut self, lsn: Lsn) {
        self.pending = Some(self.pending.map_or(lsn, |p| p.max(lsn)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::decode::{Change, Op, Relation, Timestamp};

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: Vec::new(),
        })
    }

    fn begin(final_lsn: u64) -> Event {
        Event::Begin {
            xid: 7,
            final_lsn: Lsn(final_lsn),
            commit_time: Timestamp(0),
        }
    }

    fn commit(end_lsn: u64) -> Event {
        Event::Commit {
            xid: 7,
            commit_lsn: Lsn(end_lsn - 8),
            end_lsn: Lsn(end_lsn),
            commit_time: Timestamp(0),
        }
    }

    fn message(transactional: bool, lsn: u64) -> Event {
        Event::Message {
            transactional,
            lsn: Lsn(lsn),
            prefix: "cache-invalidator".into(),
            content: b"flush:all".to_vec(),
        }
    }

    fn change() -> Event {
        Event::Change(Change {
            relation: relation(),
            op: Op::Update,
            old: None,
            new: None,
        })
    }

    /// One input of the rule.
    #[derive(Debug, Clone)]
    enum Input {
        Event(Event),
        Keepalive(u64),
    }

    fn feed(rule: &mut AckRule, input: &Input) {
        match input {
            Input::Event(e) => rule.event(e),
            Input::Keepalive(w) => rule.keepalive(Lsn(*w)),
        }
    }

    /// Every kind of input, from both states (no transaction open, one open),
    /// with nothing pending and with something pending below and above it:
    /// what it does to `in_transaction` and `pending`, per the module's table.
    #[test]
    fn every_input_from_every_state() {
        struct Case {
            name: &'static str,
            input: Input,
            /// (in_transaction after, pending moves to the input's LSN)
            outside: (bool, bool),
            inside: (bool, bool),
        }
        let cases = [
            Case {
                name: "begin",
                input: Input::Event(begin(500)),
                outside: (true, false),
                inside: (true, false),
            },
            Case {
                name: "commit",
                input: Input::Event(commit(500)),
                outside: (false, true),
                inside: (false, true),
            },
            Case {
                name: "non-transactional message",
                input: Input::Event(message(false, 500)),
                outside: (false, true),
                inside: (true, false),
            },
            Case {
                name: "transactional message (marker)",
                input: Input::Event(message(true, 500)),
                outside: (false, false),
                inside: (true, false),
            },
            Case {
                name: "keepalive",
                input: Input::Keepalive(500),
                outside: (false, true),
                inside: (true, false),
            },
            Case {
                name: "change",
                input: Input::Event(change()),
                outside: (false, false),
                inside: (true, false),
            },
            Case {
                name: "relation",
                input: Input::Event(Event::Relation(relation())),
                outside: (false, false),
                inside: (true, false),
            },
        ];
        for case in &cases {
            for (open, (open_after, moves)) in [(false, case.outside), (true, case.inside)] {
                for before in [None, Some(Lsn(100)), Some(Lsn(900))] {
                    let mut rule = AckRule {
                        in_transaction: open,
                        pending: before,
                    };
                    feed(&mut rule, &case.input);
                    let what = format!("{} (open: {open}, pending before: {before:?})", case.name);
                    assert_eq!(
                        rule.in_transaction(),
                        open_after,
                        "in_transaction after {what}"
                    );
                    let expected = if moves {
                        Some(before.map_or(Lsn(500), |b| b.max(Lsn(500))))
                    } else {
                        before
                    };
                    assert_eq!(rule.pending(), expected, "pending after {what}");
                }
            }
        }
    }

    #[test]
    fn take_empties_pending_and_keeps_the_transaction_open() {
        let mut rule = AckRule::new();
        assert_eq!(rule.take(), None);
        rule.keepalive(Lsn(10));
        rule.event(&begin(50));
        assert_eq!(rule.take(), Some(Lsn(10)));
        assert_eq!(rule.take(), None);
        assert!(rule.in_transaction());
        // A keepalive inside the open transaction still moves nothing.
        rule.keepalive(Lsn(60));
        assert_eq!(rule.take(), None);
        rule.event(&commit(58));
        assert!(!rule.in_transaction());
        assert_eq!(rule.take(), Some(Lsn(58)));
    }

    #[test]
    fn a_large_transaction_cut_into_batches_is_acknowledged_by_its_last() {
        let mut rule = AckRule::new();
        rule.event(&commit(40));
        rule.event(&begin(1000));
        assert_eq!(rule.take(), Some(Lsn(40)), "the batch before the large one");
        for _ in 0..3 {
            rule.event(&change());
            rule.keepalive(Lsn(2000));
            rule.event(&message(false, 2000));
            assert_eq!(rule.take(), None, "a chunk acknowledges nothing of it");
        }
        rule.event(&commit(1008));
        assert_eq!(rule.take(), Some(Lsn(1008)));
    }

    /// A stream of transactions (Begin, changes, transactional messages,
    /// keepalives, Commit) and idle items between them (keepalives and
    /// non-transactional messages), positions increasing; mid-transaction
    /// keepalives and messages carry positions past the transaction's end,
    /// as a walsender's may. Returns the inputs and, for each input, the
    /// end LSN of the transaction open after it (if any).
    fn stream() -> impl Strategy<Value = Vec<(Input, Option<u64>)>> {
        prop::collection::vec((0u8..4, 0usize..5, any::<bool>()), 1..30).prop_map(|txs| {
            let mut out = Vec::new();
            let mut pos = 100u64;
            for (idle, changes, message_inside) in txs {
                for i in 0..idle {
                    pos += 10;
                    let input = if i % 2 == 0 {
                        Input::Keepalive(pos)
                    } else {
                        Input::Event(message(false, pos))
                    };
                    out.push((input, None));
                }
                let end = pos + 100;
                out.push((Input::Event(begin(end - 8)), Some(end)));
                for c in 0..changes {
                    out.push((Input::Event(change()), Some(end)));
                    if c == 0 {
                        out.push((Input::Keepalive(end + 500), Some(end)));
                    }
                    if message_inside {
                        out.push((Input::Event(message(true, pos + 1)), Some(end)));
                        out.push((Input::Event(message(false, end + 600)), Some(end)));
                    }
                }
                out.push((Input::Event(commit(end)), None));
                pos = end;
            }
            out
        })
    }

    proptest! {
        /// Cut the stream into batches anywhere: no batch acknowledges a
        /// position at or past the end of a transaction still open when the
        /// batch closed; every committed transaction is acknowledged by the
        /// batch holding its Commit or a later one; acknowledgements never
        /// go backwards.
        #[test]
        fn never_acknowledges_into_an_open_transaction(
            inputs in stream(),
            cuts in prop::collection::vec(any::<bool>(), 200),
        ) {
            let mut rule = AckRule::new();
            let mut acked = Lsn::ZERO;
            let mut committed = Lsn::ZERO;
            for (i, (input, open_end)) in inputs.iter().enumerate() {
                feed(&mut rule, input);
                if let Input::Event(Event::Commit { end_lsn, .. }) = input {
                    committed = *end_lsn;
                }
                let last = i + 1 == inputs.len();
                if cuts[i % cuts.len()] || last {
                    if let Some(lsn) = rule.take() {
                        prop_assert!(lsn >= acked, "backwards: {lsn} after {acked}");
                        if let Some(end) = open_end {
                            prop_assert!(lsn.0 < *end, "acknowledged {lsn} inside the open transaction ending at {end}");
                        }
                        acked = lsn;
                    }
                    prop_assert!(acked >= committed, "commit {committed} not acknowledged by its batch (acked {acked})");
                }
            }
        }
    }
}
