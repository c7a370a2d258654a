//! Running the pipeline: source -> decode + plan -> sink -> acknowledger, as
//! tasks joined by bounded channels, so backpressure reaches the replication
//! socket; and around it the session loop (connect, stream, reconnect,
//! standby, takeover), the heartbeat and the Redis probe.
//!
//! ```text
//!  source task ──SourceItem──▶ plan stage ──Batch──▶ sink stage ──LSN──▶ Acknowledger
//!  (socket, status timer)      (decode, fold,        (Redis, retries)    (watch) ──▶ source
//!                               close batches)
//! ```
//!
//! Ordering is the acknowledgement argument: every stage is FIFO, so when the
//! sink has applied batch N, every batch before it was applied. A batch carries
//! the end LSN of the last transaction it completes; a batch cut in the middle
//! of a large transaction carries none for it, so a Commit's end LSN is
//! acknowledged only after every chunk of it (and everything before) succeeded.
//! A keepalive that reaches the plan stage with no transaction open carries its
//! WAL position the same way: idle slots do not pin WAL. ARCHITECTURE.md,
//! "The acknowledgement rule", says it whole.
//!
//! | file | job |
//! | --- | --- |
//! | `plan_stage.rs` | decode, fold into batches, decide what a batch acknowledges |
//! | `sink_stage.rs` | apply batches in order through an [`ApplySink`](crate::sink::ApplySink), retry, acknowledge |
//! | `pattern_lane.rs` | pattern passes beside the sink stage, coalesced; acknowledgements in commit order |
//! | `session.rs` | one process's loop of replication sessions: connect, stream, reconnect, standby |
//! | `heartbeat.rs` | the heartbeat message that measures end-to-end lag |
//! | `probe.rs` | the Redis probe behind `/readyz` while no batch is in flight |
//! | `publication.rs` | the publication watch: drift on `/readyz` (re-read per session and every 10 s) |

mod auto_setup;
mod heartbeat;
pub mod pattern_lane;
pub mod plan_stage;
mod probe;
mod publication;
pub mod session;
pub mod sink_stage;

pub use crate::failpoint::{self, failpoint};
pub use crate::retry::Backoff;
pub use auto_setup::AutoSetup;
pub use plan_stage::{plan_stage, BatchLimits, PlanStageError};
pub use session::Worker;
pub use sink_stage::{sink_stage, IdentityGuard};

pub use crate::plan::Batch;
pub use crate::sink::SinkObserver;

#[cfg(test)]
mod tests;
