//! Throwaway servers for integration tests, one file per server: PostgreSQL
//! ([`pg`]: `PgServer`, the one launch, and `PgCluster`, a primary), its
//! streaming replicas ([`standby`]: `Standby`, a `PgServer` too), Redis
//! ([`redis`]), Redis Cluster ([`cluster`]) and the worker under test
//! ([`worker`]: config files, setup, the sync probe, spawned workers);
//! [`common`] holds what they share (scratch directories, free ports,
//! [`wait_for`]). Everything but `standby` (used by two suites, which write
//! `support::standby::Standby`) is re-exported here, so a test file writes
//! `support::PgCluster`.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod common;
pub mod pg;
pub mod redis;
pub mod standby;
pub mod worker;

pub use self::cluster::*;
pub use self::common::*;
pub use self::pg::*;
pub use self::redis::*;
pub use self::worker::*;
