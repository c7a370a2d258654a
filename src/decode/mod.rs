//! Bytes -> pgoutput messages -> change events. Pure: no I/O, never panics on
//! input, every length checked.
//!
//! [`pgoutput`] parses one XLogData payload into a [`pgoutput::Message`];
//! [`relations::RelationCache`] turns messages into the [`Event`]s the rest of
//! the pipeline consumes, resolving relation ids to [`Relation`]s and filling
//! unchanged TOAST values from the old row.

pub mod events;
pub mod pgoutput;
pub mod relations;

pub use events::{Change, Event, Op, Relation, RelationColumn, Row, Timestamp, Value};
