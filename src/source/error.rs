//! Errors of the replication source, each with the [`RetryClass`] that tells
//! the caller what to do: reconnect, back off and retry, or stop and ask a human.
//!
//! Messages name the masked URL, the slot, the LSN where relevant, and the fix.
//! No message ever contains a password.

use std::fmt;
use std::time::Duration;

use crate::lsn::Lsn;

/// How to react to an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// The connection broke: reconnect (after a short delay) and resume from the slot.
    Reconnect,
    /// A condition that passes by itself (another worker holds the slot, the
    /// server is starting or full): wait with capped exponential backoff, retry.
    BackOffAndRetry,
    /// Needs a human (configuration, permissions, server settings): do not retry.
    Fatal,
}

impl From<RetryClass> for crate::retry::Retry {
    fn from(class: RetryClass) -> Self {
        match class {
            RetryClass::Reconnect => crate::retry::Retry::Reconnect,
            RetryClass::BackOffAndRetry => crate::retry::Retry::BackOff,
            RetryClass::Fatal => crate::retry::Retry::Fatal,
        }
    }
}

/// The fields of a server ErrorResponse / NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `PANIC` (non-localized when the server sends 'V').
    pub severity: String,
    /// SQLSTATE, e.g. `42501`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl ServerError {
    /// Parses the body of an ErrorResponse or NoticeResponse: (type byte,
    /// NUL-terminated string)* then a NUL. Unknown field types are skipped.
    pub fn parse(body: &[u8]) -> Option<ServerError> {
        let mut err = ServerError::default();
        let mut localized_severity = None;
        let mut rest = body;
        loop {
            let (&kind, after) = rest.split_first()?;
            if kind == 0 {
                break;
            }
            let nul = after.iter().position(|b| *b == 0)?;
            let value = String::from_utf8_lossy(&after[..nul]).into_owned();
            rest = &after[nul + 1..];
            match kind {
                b'V' => err.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => err.code = value,
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                _ => {}
            }
        }
        if err.severity.is_empty() {
            err.severity = localized_severity.unwrap_or_default();
        }
        Some(err)
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (DETAIL: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (HINT: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Everything that can go wrong on the replication connection, and in
/// connecting the SQL one (`pg::PgError` wraps it).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The connection string does not parse.
    #[error("invalid PostgreSQL connection string {masked}: {reason}")]
    InvalidConnectionString {
        /// The string with its password masked.
        masked: String,
        /// What is wrong.
        reason: String,
    },
    /// The TLS settings (`sslrootcert`, `sslcert`, `sslkey`) are unusable.
    #[error("invalid TLS settings ({url}): {reason}")]
    TlsConfig {
        /// Masked URL.
        url: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// `sslmode` requires TLS and the server answered that it has none.
    #[error("the server at {target} does not accept TLS connections but sslmode={sslmode} requires TLS ({url}): enable ssl on the server or use sslmode=prefer")]
    TlsRefused {
        /// `host:port`.
        target: String,
        /// The requested mode.
        sslmode: &'static str,
        /// Masked URL.
        url: String,
    },
    /// The TLS handshake failed (e.g. the server's certificate is not trusted).
    #[error("TLS handshake with {target} failed ({url}): {reason}")]
    TlsHandshake {
        /// `host:port`.
        target: String,
        /// Masked URL.
        url: String,
        /// rustls' reason, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
    },
    /// TCP connect or unix socket connect failed.
    #[error("cannot connect to PostgreSQL at {target} ({url}): {source}; is it running and listening there?")]
    Connect {
        /// `host:port` or socket path.
        target: String,
        /// Masked URL.
        url: String,
        /// The OS error (connection refused, no such file, ...).
        #[source]
        source: std::io::Error,
    },
    /// `target_session_attrs=read-write` and this server is read-only (a
    /// standby, or `default_transaction_read_only = on`).
    #[error("PostgreSQL at {target} ({url}) is read-only (a standby in recovery, or default_transaction_read_only = on) and target_session_attrs=read-write asks for the primary; no host named is one: retrying (a standby is taken once promoted)")]
    NotReadWrite {
        /// `host:port` or socket path.
        target: String,
        /// Masked URL.
        url: String,
    },
    /// Connecting and authenticating took longer than `connect_timeout`.
    #[error("connecting to PostgreSQL at {target} ({url}) timed out after {timeout:?}")]
    ConnectTimeout {
        /// `host:port` or socket path.
        target: String,
        /// Masked URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// Wrong password (28P01) or a pg_hba.conf rejection (28000).
    #[error("{message} ({url}): check the password (URL or password_file) and pg_hba.conf")]
    AuthenticationFailed {
        /// The server's message, e.g. `password authentication failed for user "x"`.
        message: String,
        /// Masked URL.
        url: String,
        /// The full server error.
        #[source]
        server: Box<ServerError>,
    },
    /// The server asks for a password and none was configured.
    #[error("the server asks for a password for user {user:?} ({method}) but none is configured ({url}): put it in the URL or in password_file")]
    PasswordRequired {
        /// Role name.
        user: String,
        /// The authentication method asked for.
        method: &'static str,
        /// Masked URL.
        url: String,
    },
    /// An authentication method we do not implement (GSS, SSPI, Kerberos...).
    #[error("unsupported authentication method {method} requested by the server ({url}): use scram-sha-256, md5, password or trust in pg_hba.conf")]
    UnsupportedAuthentication {
        /// What the server asked for.
        method: String,
        /// Masked URL.
        url: String,
    },
    /// SCRAM exchange failed locally (bad server messages, signature mismatch).
    #[error("SCRAM-SHA-256 authentication with {url} failed: {source}")]
    Scram {
        /// Masked URL.
        url: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The role may not start a walsender (42501 at startup).
    #[error("role {user:?} may not start replication ({url}): run `ALTER ROLE {user_ident} REPLICATION;` as a superuser, or connect as a role that has REPLICATION")]
    NotReplicationRole {
        /// Role name.
        user: String,
        /// The role quoted as an SQL identifier.
        user_ident: String,
        /// Masked URL.
        url: String,
        /// The full server error.
        #[source]
        server: Box<ServerError>,
    },
    /// `wal_level` is not `logical`.
    #[error("wal_level is {wal_level:?} on {url}, logical decoding needs wal_level = logical: set `wal_level = logical` in postgresql.conf or `ALTER SYSTEM SET wal_level = logical`, then restart PostgreSQL")]
    WalLevelNotLogical {
        /// The current value.
        wal_level: String,
        /// Masked URL.
        url: String,
    },
    /// PostgreSQL older than 14.
    #[error("PostgreSQL {version} at {url} is too old: cache-invalidator needs PostgreSQL 14 or later (logical decoding messages in pgoutput)")]
    ServerTooOld {
        /// `server_version` as reported.
        version: String,
        /// Masked URL.
        url: String,
    },
    /// 53400 "all replication slots are in use".
    #[error("all replication slots are in use on {url}: raise max_replication_slots (restart needed) or drop an unused slot (SELECT pg_drop_replication_slot(name))")]
    NoFreeSlots {
        /// Masked URL.
        url: String,
        /// The full server error.
        #[source]
        server: Box<ServerError>,
    },
    /// "number of requested standby connections exceeds max_wal_senders".
    #[error("no free WAL sender on {url}: the number of replication connections exceeds max_wal_senders; raise max_wal_senders (restart needed) or stop another replication client")]
    NoFreeWalSenders {
        /// Masked URL.
        url: String,
        /// The full server error.
        #[source]
        server: Box<ServerError>,
    },
    /// 55006: another process streams the slot (how a standby worker waits).
    #[error("replication slot {slot:?} is active for PID {pid}: another worker streams it; retrying with backoff (a standby takes over when it stops)")]
    SlotActive {
        /// Slot name.
        slot: String,
        /// The PID holding it (0 if the message did not say).
        pid: u32,
        /// The full server error.
        #[source]
        server: Box<ServerError>,
    },
    /// The slot does not exist.
    #[error("replication slot {slot:?} does not exist on {url}: run `cache-invalidator setup` (or set auto_setup = true)")]
    SlotMissing {
        /// Slot name.
        slot: String,
        /// Masked URL.
        url: String,
    },
    /// The slot already exists (creating it).
    #[error("replication slot {slot:?} already exists on {url}")]
    SlotExists {
        /// Slot name.
        slot: String,
        /// Masked URL.
        url: String,
    },
    /// The slot's WAL was removed (`wal_status = 'lost'`).
    #[error("replication slot {slot:?} is lost on {url} (its WAL was removed, max_slot_wal_keep_size exceeded): drop and recreate it with `cache-invalidator setup`, which flushes the mapped caches")]
    SlotLost {
        /// Slot name.
        slot: String,
        /// Masked URL.
        url: String,
        /// The server error if the stream reported it.
        #[source]
        server: Option<Box<ServerError>>,
    },
    /// The slot name is not a valid replication slot name.
    #[error("invalid replication slot name {slot:?}: use 1 to 63 lowercase letters, digits and underscores")]
    InvalidSlotName {
        /// The name.
        slot: String,
    },
    /// The publication does not exist.
    #[error("publication {publication:?} does not exist on {url} (dropped?): changes made while it is missing are never sent; run `cache-invalidator setup`, which recreates it and, when the slot cannot decode past the gap, the slot with a full flush")]
    PublicationMissing {
        /// Publication name.
        publication: String,
        /// Masked URL.
        url: String,
    },
    /// An ErrorResponse without a more specific variant.
    #[error("PostgreSQL error during {during} ({url}): {server}")]
    Server {
        /// What we were doing.
        during: String,
        /// Masked URL.
        url: String,
        /// The server error.
        server: Box<ServerError>,
    },
    /// The connection closed or failed mid-conversation.
    #[error("replication connection to {url} lost during {during}{at}", at = lsn.map(|l| format!(" (acknowledged up to {l})")).unwrap_or_default())]
    ConnectionLost {
        /// What we were doing.
        during: String,
        /// Masked URL.
        url: String,
        /// The last acknowledged LSN, when streaming.
        lsn: Option<Lsn>,
        /// The I/O error, if not a clean EOF.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The server sent something the protocol does not allow here.
    #[error("protocol error from {url} during {during}: {reason}")]
    Protocol {
        /// What we were doing.
        during: String,
        /// Masked URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The connection was left unusable by an earlier error (e.g. a timed-out command).
    #[error("the replication connection to {url} is unusable after an earlier error; reconnect")]
    Poisoned {
        /// Masked URL.
        url: String,
    },
}

impl SourceError {
    /// What the caller should do about it.
    pub fn retry_class(&self) -> RetryClass {
        use SourceError::*;
        match self {
            InvalidConnectionString { .. }
            | TlsConfig { .. }
            | TlsRefused { .. }
            | TlsHandshake { .. }
            | AuthenticationFailed { .. }
            | PasswordRequired { .. }
            | UnsupportedAuthentication { .. }
            | Scram { .. }
            | NotReplicationRole { .. }
            | WalLevelNotLogical { .. }
            | ServerTooOld { .. }
            | NoFreeSlots { .. }
            | SlotMissing { .. }
            | SlotExists { .. }
            | SlotLost { .. }
            | InvalidSlotName { .. }
            | PublicationMissing { .. } => RetryClass::Fatal,
            Connect { .. }
            | ConnectTimeout { .. }
            | NotReadWrite { .. }
            | NoFreeWalSenders { .. }
            | SlotActive { .. } => RetryClass::BackOffAndRetry,
            ConnectionLost { .. } | Protocol { .. } | Poisoned { .. } => RetryClass::Reconnect,
            Server { server, .. } => class_of_sqlstate(&server.code),
        }
    }
}

/// Retry class of a SQLSTATE that no specific variant covers (`pg::PgError`
/// classifies its failed statements with it too).
pub fn class_of_sqlstate(code: &str) -> RetryClass {
    match code {
        // Connection exceptions; admin shutdown / crash shutdown / cannot connect now.
        c if c.starts_with("08") => RetryClass::Reconnect,
        "57P01" | "57P02" => RetryClass::Reconnect,
        "57P03" | "53300" | "55006" | "40001" | "40P01" | "55P03" | "57014" => {
            RetryClass::BackOffAndRetry
        }
        _ => RetryClass::Fatal,
    }
}

/// Turns an ErrorResponse into the most specific [`SourceError`].
pub(crate) fn classify(
    server: ServerError,
    during: &str,
    url: &str,
    user: &str,
    slot: Option<&str>,
    publication: Option<&str>,
) -> SourceError {
    let url = url.to_string();
    let server = Box::new(server);
    let msg = server.message.clone();
    let msg = msg.as_str();
    match server.code.as_str() {
        "28P01" | "28000" => SourceError::AuthenticationFailed {
            message: server.message.clone(),
            url,
            server,
        },
        "42501"
            if msg.contains("replication")
                || msg.contains("WAL sender")
                || msg.contains("walsender") =>
        {
            SourceError::NotReplicationRole {
                user: user.to_string(),
                user_ident: crate::quote::quote_ident(user),
                url,
                server,
            }
        }
        "53400" => SourceError::NoFreeSlots { url, server },
        "53300" if msg.contains("max_wal_senders") => SourceError::NoFreeWalSenders { url, server },
        "55006" => SourceError::SlotActive {
            slot: slot.unwrap_or_default().to_string(),
            pid: msg
                .rsplit("PID ")
                .next()
                .and_then(|p| p.trim_end_matches('.').trim().parse().ok())
                .unwrap_or(0),
            server,
        },
        "42704" if msg.contains("replication slot") => SourceError::SlotMissing {
            slot: slot.unwrap_or_default().to_string(),
            url,
        },
        "42704" if msg.contains("publication") => SourceError::PublicationMissing {
            // `publication "x" does not exist`: name it once, not the message.
            publication: publication
                .map(str::to_string)
                .or_else(|| quoted_name(msg))
                .unwrap_or_else(|| msg.to_string()),
            url,
        },
        "42710" if msg.contains("replication slot") => SourceError::SlotExists {
            slot: slot.unwrap_or_default().to_string(),
            url,
        },
        "55000" if msg.contains("wal_level") => SourceError::WalLevelNotLogical {
            wal_level: "not logical".into(),
            url,
        },
        _ if msg.contains("can no longer get changes from replication slot")
            || msg.contains("has been invalidated") =>
        {
            SourceError::SlotLost {
                slot: slot.unwrap_or_default().to_string(),
                url,
                server: Some(server),
            }
        }
        _ => SourceError::Server {
            during: during.to_string(),
            url,
            server,
        },
    }
}

/// The first double-quoted name of a server message (`publication "x" does
/// not exist` -> `x`), with `""` unescaped.
fn quoted_name(msg: &str) -> Option<String> {
    let start = msg.find('"')? + 1;
    let rest = &msg[start..];
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            if chars.peek() == Some(&'"') {
                chars.next();
                out.push('"');
            } else {
                return Some(out);
            }
        } else {
            out.push(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_publication_is_named_once() {
        let server = ServerError {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "publication \"adv_pub\" does not exist".into(),
            detail: None,
            hint: None,
        };
        let e = classify(server, "streaming", "u", "x", Some("s"), None);
        let text = e.to_string();
        assert!(
            matches!(e, SourceError::PublicationMissing { ref publication, .. } if publication == "adv_pub"),
            "{text}"
        );
        assert_eq!(text.matches("adv_pub").count(), 1, "{text}");
        assert_eq!(quoted_name("x \"a\"\"b\" y").as_deref(), Some("a\"b"));
    }

    fn body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in fields {
            b.push(*k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn parses_error_fields() {
        let e = ServerError::parse(&body(&[
            (b'S', "FEHLER"),
            (b'V', "ERROR"),
            (b'C', "55006"),
            (b'M', "replication slot \"s\" is active for PID 4242"),
            (b'D', "d"),
            (b'H', "h"),
            (b'F', "slot.c"),
        ]))
        .unwrap();
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.detail.as_deref(), Some("d"));
        let c = classify(e, "START_REPLICATION", "u", "x", Some("s"), None);
        assert!(
            matches!(c, SourceError::SlotActive { pid: 4242, .. }),
            "{c:?}"
        );
        assert_eq!(c.retry_class(), RetryClass::BackOffAndRetry);
        assert!(ServerError::parse(b"Cunterminated").is_none());
        assert!(ServerError::parse(b"").is_none());
    }
}
