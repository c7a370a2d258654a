//! Throwaway servers for integration tests, one file per server: PostgreSQL
//! ([`pg`]), Redis ([`redis`]), Redis Cluster ([`cluster`]) and the worker
//! under test ([`worker`]); [`common`] holds what they share (scratch
//! directories, free ports, [`wait_for`]). Everything is re-exported here, so
//! a test file writes `support::PgCluster`.
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
