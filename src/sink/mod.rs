//! Executes a [`Plan`](crate::plan::Plan) against Redis, and what the sink
//! stage needs around it.
//!
//! Layout:
//! - [`options`]: [`SinkOptions`] and [`RedisTls`], built from the config;
//! - `client`: the redis client for the options ([`client()`]: password
//!   override, TLS files);
//! - [`single`]: [`RedisSink`], one server, pipelined rounds;
//! - [`cluster`]: [`ClusterSink`], a Redis Cluster, per slot;
//! - `shared`: what both executors share (found keys, reply checks, WAIT,
//!   the delayed second delete); [`stats`]: [`ApplyStats`];
//! - [`scripts`], [`refresh`], [`patterns`]: the Lua scripts, refreshed
//!   values, pattern passes; [`identity`]: detecting a restarted Redis;
//! - [`any`]: [`Sink`], either executor; [`apply`]: the [`ApplySink`] trait
//!   the sink stage runs on, [`memory`]: [`MemorySink`], its in-memory
//!   implementation for tests; [`error`]: [`SinkError`] and its
//!   [`RetryClass`].

pub mod any;
pub mod apply;
mod client;
pub mod cluster;
pub mod error;
pub mod identity;
pub mod memory;
pub mod options;
pub mod patterns;
pub mod refresh;
pub mod scripts;
mod shared;
pub mod single;
pub mod stats;

pub use any::Sink;
pub use apply::{ApplySink, SinkObserver};
pub use client::client;
pub use cluster::ClusterSink;
pub use error::{mask_url, RetryClass, SinkError};
pub use memory::MemorySink;
pub use options::{RedisTls, SinkOptions};
pub use patterns::{has_patterns, take_patterns, PassReport};
pub use shared::{SinkTuning, DEFAULT_TOMBSTONE_MS};
pub use single::RedisSink;
pub use stats::ApplyStats;
