//! The replication source: everything between PostgreSQL's walsender and the
//! decoder. One concern per file:
//!
//! * [`conninfo`]: libpq URL / keyword-value parsing, masked display.
//! * [`connection`]: the socket, startup with the pinned session settings,
//!   authentication, simple-protocol commands (`IDENTIFY_SYSTEM`, `SHOW`).
//! * [`frame`]: the pure frame splitter; [`copyboth`]: XLogData, keepalive,
//!   standby status update bytes.
//! * [`slot`]: temporary slots (for `record`), dropping, `START_REPLICATION`.
//! * [`stream`]: the task that forwards [`SourceItem`]s and sends status updates.
//! * [`error`]: [`SourceError`] and its [`RetryClass`].
//!
//! Not here: pgoutput decoding (`decode/`), acknowledgement bookkeeping
//! (`ack`): this module reports whatever LSN the acknowledger publishes; the
//! SQL connection (`pg`, built on these settings, TLS setup and errors).

pub mod connection;
pub mod conninfo;
pub mod copyboth;
pub mod error;
pub mod frame;
pub mod slot;
pub mod stream;
pub mod tls;

pub use connection::{connect, ReplicationConnection, SystemIdentity};
pub use conninfo::{ConnectionSettings, Host, SslMode, TargetSessionAttrs};
pub use error::{RetryClass, ServerError, SourceError};
pub use slot::{create_temporary_slot, drop_slot, slot_synced, start_replication, CreatedSlot};
pub use stream::{spawn_stream, SourceItem, StreamControl};
