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
//!  plan/     fold changes (and declared invalidations, plan/declared.rs) into one deduplicated Plan per batch
//!        │                                         │
//!  sink/     execute a Plan against Redis (UNLINK, scripts, SCAN, PUBLISH; one server or a Cluster)
//!        │  "applied up to LSN"                    │
//!  ack       in-order acknowledgement; the flushed LSN only moves forward
//! ```
//!
//! `config` and `map` load and validate the service config and the mapping
//! files (`diag` locates their errors); `replay` runs mappings over recorded
//! transactions offline, which is also the library API for users' own tests:
//!
//! ```
//! use std::sync::Arc;
//! use cache_invalidator::map::Mappings;
//! use cache_invalidator::plan::PlannerContext;
//!
//! let mappings = Arc::new(Mappings::parse("posts.toml", r#"
//!     [[table]]
//!     name = "posts"
//!     keys = ["post:{id}", "author:{author_id}:posts"]
//! "#)?);
//! // A post moved from author 1 to author 2: both authors' lists are invalidated.
//! let recorded = concat!(
//!     r#"{"xid":1,"lsn":"0/10","changes":[{"table":"posts","op":"update","#,
//!     r#""old":{"id":"7","author_id":"1"},"new":{"id":"7","author_id":"2"}}]}"#,
//! );
//! let plans = cache_invalidator::replay::replay_str(mappings, PlannerContext::default(), recorded)?;
//! assert_eq!(plans[0].keys, ["author:1:posts", "author:2:posts", "post:7"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `worker` runs the pipeline for `run`: the plan and sink stages, the session
//! loop (reconnect, standby, takeover), the heartbeat and the Redis probe; the
//! sink stage drives any [`sink::ApplySink`] (Redis, or the in-memory
//! [`sink::MemorySink`] of the unit tests). `cli/` holds one file per
//! subcommand; `config` turns the service TOML into a validated model;
//! `cache` holds the application-side helpers (tagged set, versioned get/set).
//! `preflight` holds the start-up checks `run` does and `check` prints.
//! `metrics` holds the Prometheus metrics, the `/livez` and `/readyz` state and
//! the HTTP endpoint serving them; `log_fields` names the `tracing` fields.
//!
//! ARCHITECTURE.md in the repository describes the modules, what each may
//! not import, the acknowledgement rule and the guarantees with their tests.
//!
//! What this crate is not: a cache. It never fills Redis with data; it only
//! removes (or bumps, or announces) what a committed change made stale.
#![warn(missing_docs)]

pub mod ack;
pub mod cache;
pub mod cli;
pub mod config;
pub mod decode;
pub mod diag;
pub mod error;
pub mod failpoint;
pub mod log_fields;
pub mod lsn;
pub mod map;
pub mod metrics;
pub mod pg;
pub mod plan;
pub mod preflight;
pub mod quote;
pub mod repeats;
pub mod replay;
pub mod retry;
pub mod security;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod visibility;
pub mod worker;

pub use error::CliError;
pub use lsn::Lsn;
