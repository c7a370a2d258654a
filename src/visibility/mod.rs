//! Visible before invalidated (guarantee 9): a batch is applied only once
//! the rows it invalidates can be read, on the primary and on every listed
//! read replica, so a reader that misses after the invalidation reads the
//! new row and never refills the cache with the old one.
//!
//! * [`primary`]: the snapshot check (`pg_current_snapshot()`): a commit
//!   waiting for a synchronous standby is in the WAL but not visible yet.
//! * [`replicas`]: replay positions of `[postgres] replicas`, bounded by
//!   `replica_max_wait_ms`, with re-application after a timeout.
//! * [`report`]: what `check` and `status` say about the replicas.
//!
//! The sink stage calls both before it applies a batch; see ARCHITECTURE.md
//! and docs/race-proof-fills.md for the windows this closes.

pub mod primary;
pub mod replicas;
pub mod report;

pub use primary::{PrimaryVisibility, Snapshot};
pub use replicas::{ReplicaContext, ReplicaState, Replicas};

use crate::lsn::Lsn;
use crate::plan::Batch;

/// The sink stage's check before it applies a batch: the primary's
/// snapshot, then the listed replicas. Either part may be absent
/// (`visibility_check = false`, no `replicas`).
#[derive(Debug, Default)]
pub struct VisibilityGate {
    primary: Option<PrimaryVisibility>,
    replicas: Option<Replicas>,
}

/// What the gate found for one batch, for after it was applied.
#[derive(Debug, Default)]
#[must_use = "hand it to VisibilityGate::applied once the batch is applied"]
pub struct Passed {
    /// Replicas the batch is applied ahead of (timed out, or still behind).
    late_replicas: Vec<replicas::Ahead>,
    /// The position those replicas must replay before it is applied again.
    target: Lsn,
}

impl VisibilityGate {
    /// No check at all (tests of the stages; `visibility_check = false`
    /// without replicas).
    pub fn disabled() -> Self {
        VisibilityGate::default()
    }

    /// A gate with the given parts.
    pub fn new(primary: Option<PrimaryVisibility>, replicas: Option<Replicas>) -> Self {
        VisibilityGate { primary, replicas }
    }

    /// The replicas, if any are listed.
    pub fn replicas(&self) -> Option<&Replicas> {
        self.replicas.as_ref()
    }

    /// Waits until `batch` may be applied: its transactions visible on the
    /// primary, then replayed by every replica that counts (bounded). A batch
    /// with nothing to apply passes at once.
    pub async fn before_apply(&mut self, batch: &Batch) -> Passed {
        if batch.plan.is_empty() {
            return Passed::default();
        }
        if let Some(primary) = self.primary.as_mut() {
            primary.wait_visible(&batch.xids).await;
        }
        let Some(replicas) = self.replicas.as_ref() else {
            return Passed::default();
        };
        let Some(last_commit) = batch.last_commit_lsn else {
            return Passed::default();
        };
        // Replayed past the commit record: replay position > its start.
        let target = Lsn(last_commit.0.saturating_add(1));
        Passed {
            late_replicas: replicas.wait_replayed(target).await,
            target,
        }
    }

    /// The batch was applied: queue it again for the replicas it went ahead of.
    pub fn applied(&self, passed: Passed, batch: &Batch) {
        if passed.late_replicas.is_empty() {
            return;
        }
        if let Some(replicas) = self.replicas.as_ref() {
            replicas.reapply_later(&passed.late_replicas, passed.target, &batch.plan);
        }
    }
}
