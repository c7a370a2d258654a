//! The SQL side of PostgreSQL (the replication connection lives in
//! `source/`): every plain SQL connection the service opens, and what it reads.
//!
//! * [`client`]: the one connect path ([`connect`], [`connect_url`]: TLS per
//!   `sslmode`, the pinned session settings, several hosts) and
//!   [`SqlClient`]'s statements (publication existence, logical messages, the
//!   transactions a slot creation waits for).
//! * [`catalog`]: the catalog facts the checks, `setup` and `status` need,
//!   among them the one server version reader
//!   ([`catalog::server_version_num`]) and the one slot reader
//!   ([`catalog::slot`]).
//! * [`failover`]: the failover-slot state (17+).
//! * [`error`]: [`PgError`], the one error of the SQL side, with its
//!   retry class.
//!
//! Errors never show the password (URLs are shown masked, by
//! `source::conninfo`). Quoting is the leaf `crate::quote`.

pub mod catalog;
pub mod client;
pub mod error;
pub mod failover;

pub use client::{connect, connect_url, BlockingTransaction, SqlClient};
pub use error::{describe, PgError};
