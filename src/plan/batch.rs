//! [`Batch`]: one unit of work handed from the worker's plan stage to its sink
//! stage: a deduplicated [`Plan`] and the position it acknowledges once Redis
//! confirmed it (ARCHITECTURE.md, "The acknowledgement rule").

use super::Plan;
use crate::decode::Timestamp;
use crate::lsn::Lsn;

/// One unit of work for the sink: a plan and what it completes.
#[derive(Debug, Default)]
pub struct Batch {
    /// The deduplicated Redis work.
    pub plan: Plan,
    /// Acknowledge up to here once the plan is applied (the end LSN of the
    /// last transaction completed in this batch, or an idle keepalive position).
    pub ack: Option<Lsn>,
    /// Transactions completed in this batch.
    pub transactions: u64,
    /// Row changes folded into this batch.
    pub changes: u64,
    /// Commit time of the first transaction completed in this batch (latency).
    pub first_commit_time: Option<Timestamp>,
    /// Transaction ids (as the Begin messages carry them) of every
    /// transaction with changes in this batch, including one cut into
    /// chunks: its chunks are applied before its Commit arrives. The sink
    /// stage waits until they are visible on the primary (guarantee 9).
    pub xids: Vec<u32>,
    /// The highest commit LSN (Begin's final LSN) of those transactions:
    /// listed read replicas must replay past it before the batch is applied.
    pub last_commit_lsn: Option<Lsn>,
}

impl Batch {
    /// Nothing to apply, nothing to acknowledge, no change counted.
    pub fn is_idle(&self) -> bool {
        self.plan.is_empty() && self.ack.is_none() && self.changes == 0
    }
}
