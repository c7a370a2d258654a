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
//!
//! Errors never show the password (URLs are shown masked, by
//! `source::conninfo`). Quoting is the leaf `crate::quote`.

pub mod catalog;
pub mod client;
pub mod failover;

pub use client::{connect, connect_url, BlockingTransaction, SqlClient};

/// The `application_name` of every connection this service opens (unless the
/// URL sets another).
pub const APPLICATION_NAME: &str = crate::source::conninfo::DEFAULT_APPLICATION_NAME;

/// A failure talking SQL to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Connecting failed (the source's error says what and what to do).
    #[error(transparent)]
    Source {
        /// The cause.
        source: crate::source::SourceError,
    },
    /// A statement failed.
    #[error("PostgreSQL: {what} failed: {detail}")]
    Query {
        /// What was being done (a short phrase or the statement).
        what: String,
        /// The server's message, flattened.
        detail: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl PgError {
    /// Wraps a failed statement.
    pub fn query(what: impl Into<String>, source: tokio_postgres::Error) -> PgError {
        PgError::Query {
            what: what.into(),
            detail: describe(&source),
            source,
        }
    }

    /// The SQLSTATE code of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Query { source, .. } => source.as_db_error().map(|e| e.code().code()),
            PgError::Source { .. } => None,
        }
    }
}

/// A tokio-postgres error in one line: the server's message (with its detail
/// and hint) when there is one, otherwise the error and its causes.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut s = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(d) = db.detail() {
            s.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}
