//! Visible before invalidated (guarantee 8): a batch is applied only once
//! the rows it invalidates can be read, on the primary and on every listed
//! read replica, so a reader that misses after the invalidation reads the
//! new row and never refills the cache with the old one.
//!
//! * [`primary`]: the snapshot check (`pg_current_snapshot()`): a commit
//!   waiting for a synchronous standby is in the WAL but not visible yet.
//! * [`replicas`]: replay positions of `[postgres] replicas`, bounded by
//!   `replica_max_wait_ms`, with re-application after a timeout.
//!
//! The sink stage calls both before it applies a batch; see ARCHITECTURE.md
//! and docs/race-proof-fills.md for the windows this closes.

pub mod primary;
pub mod replicas;

pub use primary::{PrimaryVisibility, Snapshot};
pub use replicas::{ReplicaContext, ReplicaState, Replicas};
