//! # cache-invalidator
//!
//! Turns committed PostgreSQL row changes into Redis cache invalidations.
//!
//! ```text
//!  PostgreSQL walsender
//!        │  CopyBoth: XLogData / keepalive        ▲ standby status updates (flushed LSN)
//!        ▼                                         │
//!  source/   replication connection, framing ──────┤
//!        │  XLogData payloads                      │
//!  decode/   pgoutput -> Event (Begin, Change, Message, Commit)
//!        │                                         │
//!  map/      mapping rules: row -> keys, tags, versions, patterns, messages
//!  plan/     fold changes into one deduplicated Plan per batch
//!        │                                         │
//!  sink/     execute a Plan against Redis (UNLINK, scripts, SCAN, PUBLISH)
//!        │  "applied up to LSN"                    │
//!  ack       in-order acknowledgement; the flushed LSN only moves forward
//! ```
//!
//! `worker` wires the stages together for `run`; `cli/` holds one file per
//! subcommand; `config` turns the service TOML into a validated model;
//! `cache` holds the application-side helpers (tagged set, versioned get/set).
//!
//! What this crate is not: a cache. It never fills Redis with data; it only
//! removes (or bumps, or announces) what a committed change made stale.
#![warn(missing_docs)]

pub mod cli;
pub mod decode;
pub mod error;
pub mod lsn;
pub mod plan;
pub mod source;

pub use error::CliError;
pub use lsn::Lsn;
