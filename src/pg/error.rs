//! [`PgError`]: the one error of the SQL side, whatever asked (the worker's
//! side tasks, the visibility checks, the commands). It keeps its cause and
//! knows its [`RetryClass`]: a failed connection is the replication side's
//! [`SourceError`] (authentication, TLS, an unreachable or read-only server:
//! the same messages and classes); a failed statement, and a connection the
//! server refused otherwise (a missing database, too many connections), is
//! classified by its SQLSTATE.
//! It lives in `pg`, not `source`, because `source` may not import `pg`
//! (ARCHITECTURE.md, "Modules") and needs nothing of it.

use crate::source::error::class_of_sqlstate;
use crate::source::{RetryClass, SourceError};

/// A failure talking SQL to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Connecting failed, or a condition the replication connection reports
    /// alike (a missing publication): the source's error says what and what
    /// to do.
    #[error(transparent)]
    Source {
        /// The cause.
        source: SourceError,
    },
    /// A statement failed.
    #[error("PostgreSQL{at}: {what} failed: {detail}", at = url.as_deref().map(|u| format!(" ({u})")).unwrap_or_default())]
    Query {
        /// What was being done (a short phrase or the statement).
        what: String,
        /// The masked URL, when the caller knows it.
        url: Option<String>,
        /// The server's message with its detail and hint, or the client's
        /// error with its causes: the whole chain, flattened.
        detail: String,
        /// The error itself, for its SQLSTATE. Not a `source`: `detail`
        /// already says all of it, and the CLI prints a source's chain again
        /// (`caused by: db error`).
        cause: tokio_postgres::Error,
    },
    /// The server's answer was not what the statement returns (or did not
    /// come in time): the connection is not to be trusted, reconnect.
    #[error("PostgreSQL ({url}): {what}: {reason}")]
    Answer {
        /// What was being done.
        what: String,
        /// The masked URL.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
}

impl From<SourceError> for PgError {
    fn from(source: SourceError) -> Self {
        PgError::Source { source }
    }
}

impl PgError {
    /// Wraps a failed statement.
    pub fn query(what: impl Into<String>, cause: tokio_postgres::Error) -> PgError {
        PgError::Query {
            what: what.into(),
            url: None,
            detail: describe(&cause),
            cause,
        }
    }

    /// Names the (masked) URL of the server a failed statement ran on.
    pub fn at(mut self, masked_url: &str) -> PgError {
        if let PgError::Query { url, .. } = &mut self {
            *url = Some(masked_url.to_owned());
        }
        self
    }

    /// The SQLSTATE code of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Query { cause, .. } => cause.as_db_error().map(|e| e.code().code()),
            PgError::Source { .. } | PgError::Answer { .. } => None,
        }
    }

    /// What the caller should do about it: a connection's error as the
    /// replication side classifies it; a statement by its SQLSTATE (one
    /// without a server error lost its connection: reconnect).
    pub fn retry_class(&self) -> RetryClass {
        match self {
            PgError::Source { source } => source.retry_class(),
            PgError::Query { cause, .. } => match cause.code() {
                Some(code) => class_of_sqlstate(code.code()),
                None => RetryClass::Reconnect,
            },
            PgError::Answer { .. } => RetryClass::Reconnect,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_error_keeps_its_message_and_class() {
        let source = SourceError::NotReadWrite {
            target: "h:5432".into(),
            url: "postgres://u@h/d".into(),
        };
        let text = source.to_string();
        let err = PgError::from(source).at("ignored: not a statement");
        assert_eq!(err.to_string(), text);
        assert_eq!(err.retry_class(), RetryClass::BackOffAndRetry);
        let missing = PgError::from(SourceError::PublicationMissing {
            publication: "p".into(),
            url: "postgres://u@h/d".into(),
        });
        assert_eq!(missing.retry_class(), RetryClass::Fatal);
        assert_eq!(missing.sqlstate(), None);
    }

    #[test]
    fn an_unusable_answer_reconnects() {
        let err = PgError::Answer {
            what: "pg_logical_emit_message".into(),
            url: "postgres://u@h/d".into(),
            reason: "not an LSN: \"x\"".into(),
        };
        assert_eq!(err.retry_class(), RetryClass::Reconnect);
        assert_eq!(
            err.to_string(),
            "PostgreSQL (postgres://u@h/d): pg_logical_emit_message: not an LSN: \"x\""
        );
    }
}
