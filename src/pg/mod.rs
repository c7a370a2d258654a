//! Plain SQL connections to PostgreSQL (not the replication connection, which
//! lives in `source/`): used by `check`, `setup` and `status`.
//!
//! [`connect_sql`] opens one tokio-postgres connection through the source's
//! connection path (TLS per `sslmode`, pinned session settings).
//! Errors never show the password: [`mask_conninfo`] hides it in URLs and in
//! `key=value` strings alike. [`catalog`] reads the catalog facts the checks,
//! `setup` and `status` need; [`failover`] the failover-slot state (17+).

pub mod catalog;
pub mod failover;

/// The `application_name` of every connection this service opens.
pub const APPLICATION_NAME: &str = "cache-invalidator";

/// A failure talking SQL to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Connecting failed (the source's error says what and what to do).
    #[error("{source}")]
    Source {
        /// The cause.
        #[source]
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

/// A connection string with its password replaced by `***`: libpq URLs
/// (`postgres://user:secret@host/db`, `?password=`) and `key=value` strings.
pub fn mask_conninfo(conninfo: &str) -> String {
    let s = conninfo.trim();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return match url::Url::parse(s) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                if u.query_pairs().any(|(k, _)| k == "password") {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let v = if k == "password" {
                                "***".into()
                            } else {
                                v.into_owned()
                            };
                            (k.into_owned(), v)
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            Err(_) => "<unparseable PostgreSQL URL>".to_owned(),
        };
    }
    // key=value: mask the value after `password=` (quoted or not).
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password") {
        let (before, after) = rest.split_at(i);
        out.push_str(before);
        let after_key = &after["password".len()..];
        let trimmed = after_key.trim_start();
        let at_word_start = before.is_empty() || before.ends_with(char::is_whitespace);
        if at_word_start && trimmed.starts_with('=') {
            out.push_str("password=***");
            let value = trimmed[1..].trim_start();
            rest = if let Some(quoted) = value.strip_prefix('\'') {
                // Skip to the closing quote (backslash escapes allowed).
                let mut end = quoted.len();
                let mut escaped = false;
                for (j, c) in quoted.char_indices() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '\'' {
                        end = j + 1;
                        break;
                    }
                }
                &quoted[end.min(quoted.len())..]
            } else {
                let end = value.find(char::is_whitespace).unwrap_or(value.len());
                &value[end..]
            };
        } else {
            out.push_str("password");
            rest = after_key;
        }
    }
    out.push_str(rest);
    out
}

/// Opens a plain SQL connection (no TLS) with
/// `application_name=cache-invalidator` and spawns its connection task.
///
/// `url` is a libpq URL or `key=value` string (`host=/socket/dir` for unix
/// sockets); `password`, when given, overrides the one in `url`.
pub async fn connect_sql(
    url: &str,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, PgError> {
    // One connection path for every command: the source's, which speaks TLS
    // (sslmode, sslrootcert, client certificates) and pins the session settings.
    let settings = crate::source::ConnectionSettings::parse(url, password.map(str::to_owned))
        .map_err(|source| PgError::Source { source })?;
    let sql = crate::source::connect_sql(&settings)
        .await
        .map_err(|source| PgError::Source { source })?;
    Ok(sql.into_client())
}

pub use crate::quote::{quote_ident, quote_literal};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_everywhere() {
        assert_eq!(
            mask_conninfo("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        let m = mask_conninfo("postgres://u@h/db?password=secret&sslmode=disable");
        assert!(
            !m.contains("secret") && m.contains("sslmode=disable"),
            "{m}"
        );
        assert_eq!(
            mask_conninfo("host=/tmp password=secret user=u"),
            "host=/tmp password=*** user=u"
        );
        assert_eq!(
            mask_conninfo("host=h password = 'se cr\\'et' dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(mask_conninfo("host=h user=u"), "host=h user=u");
        assert!(!mask_conninfo("postgres://u:secret@[bad").contains("secret"));
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("Weird\"Name"), "\"Weird\"\"Name\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
