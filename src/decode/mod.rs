//! Bytes -> pgoutput messages -> change events. Pure: no I/O, never panics on
//! input, every length checked.
//!
//! [`pgoutput`] parses one XLogData payload into a [`pgoutput::Message`];
//! [`relations::RelationCache`] turns messages into the [`Event`]s the rest of
//! the pipeline consumes, resolving relation ids to [`Relation`]s and filling
//! unchanged TOAST values from the old row. Errors are [`DecodeError`]s naming
//! the message type, the LSN and the byte offset. `tests/decode_pgoutput.rs`
//! holds the tests on bytes captured from PostgreSQL 15 and the no-panic
//! property tests; `fuzz/` a cargo-fuzz target (`cargo +nightly fuzz run pgoutput`).

pub mod events;
pub mod pgoutput;
pub mod relations;

pub use events::{Change, Event, Op, Relation, RelationColumn, Row, Timestamp, Value};
pub use pgoutput::{parse, DecodeError, Message};
pub use relations::RelationCache;
