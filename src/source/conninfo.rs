//! Connection settings from a libpq connection string: the URL form
//! (`postgres://user:pass@host:port/db?sslmode=prefer&host=/run/postgresql`)
//! or the keyword/value form (`host=/run/postgresql port=5432 user=app`).
//!
//! Several hosts are tried in order, as libpq does (`postgres://h1:5432,h2:5433/db`,
//! `host=h1,h2 port=5432,5433`); with `target_session_attrs=read-write` a
//! server in recovery (a standby) is skipped, so after a failover the
//! promoted standby is found ([`ConnectionSettings::candidates`]).
//!
//! Passwords never leave this module in clear text except to authentication:
//! [`ConnectionSettings`]'s `Display` and `Debug` print the URL with the
//! password masked as `***`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::SourceError;

mod parse;

use parse::{encode, parse_keyword_value, parse_url, skip_value};

/// The default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

/// The `application_name` used when the connection string names none.
pub const DEFAULT_APPLICATION_NAME: &str = "cache-invalidator";

/// How long connecting may take when `connect_timeout` is not given.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A TCP host name or address.
    Tcp(String),
    /// A directory holding the unix socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// libpq's `sslmode` (see [`super::tls`] for what each one does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Plaintext (libpq would retry with TLS if the server insists; we do not).
    Allow,
    /// TLS if the server accepts it, else plaintext. libpq's default.
    Prefer,
    /// TLS required, certificate not checked.
    Require,
    /// TLS required, certificate chain checked.
    VerifyCa,
    /// TLS required, certificate chain and host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's `target_session_attrs`: which of several servers will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// The first server that accepts the connection (libpq's default).
    #[default]
    Any,
    /// A server that accepts writes (`transaction_read_only = off`): the primary.
    ReadWrite,
}

impl TargetSessionAttrs {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "any" => TargetSessionAttrs::Any,
            "read-write" | "primary" => TargetSessionAttrs::ReadWrite,
            _ => return None,
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
        }
    }
}

/// `sslrootcert`: where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's store.
    System,
}

/// Validated connection settings.
#[derive(Clone)]
pub struct ConnectionSettings {
    /// Where to connect: the first of [`ConnectionSettings::hosts`], or the
    /// one a connection chose (see [`ConnectionSettings::candidates`]).
    pub host: Host,
    /// TCP port, also the unix socket's suffix (of [`ConnectionSettings::host`]).
    pub port: u16,
    /// Every server named, in the order they are tried (one for most URLs).
    pub hosts: Vec<(Host, u16)>,
    /// Which server of several will do.
    pub target_session_attrs: TargetSessionAttrs,
    /// Role name.
    pub user: String,
    /// Password, if any (from the URL or a password file).
    pub password: Option<String>,
    /// Database name.
    pub dbname: String,
    /// TLS mode (see [`SslMode`]).
    pub sslmode: SslMode,
    /// `sslrootcert`: CA certificates to check the server's certificate against.
    pub sslrootcert: Option<RootCert>,
    /// `sslcert`: client certificate (PEM).
    pub sslcert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM).
    pub sslkey: Option<PathBuf>,
    /// `application_name` reported to the server.
    pub application_name: String,
    /// Upper bound on connecting and authenticating.
    pub connect_timeout: Duration,
}

impl ConnectionSettings {
    /// Parses a libpq URL (`postgres://` or `postgresql://`) or keyword/value
    /// string. `password_override` (e.g. read from `password_file`) replaces
    /// any password in the string.
    pub fn parse(conn: &str, password_override: Option<String>) -> Result<Self, SourceError> {
        let raw = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
            parse_url(conn)
        } else {
            parse_keyword_value(conn)
        };
        let invalid = |reason: String| SourceError::InvalidConnectionString {
            masked: mask_connection_string(conn),
            reason,
        };
        let raw = raw.map_err(invalid)?;
        let port_of = |p: &str| -> Result<u16, SourceError> {
            if p.is_empty() {
                return Ok(DEFAULT_PORT);
            }
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("invalid port {p:?}")))
        };
        let host_of = |h: &str| -> Host {
            if h.is_empty() {
                Host::Unix(PathBuf::from("/var/run/postgresql"))
            } else if h.starts_with('/') {
                Host::Unix(PathBuf::from(h))
            } else {
                Host::Tcp(h.to_string())
            }
        };
        // libpq: `host` and `port` are comma-separated lists; one port
        // serves every host, else there is one port per host.
        let host_list: Vec<&str> = raw.host.as_deref().unwrap_or("").split(',').collect();
        let port_list: Vec<&str> = raw.port.as_deref().unwrap_or("").split(',').collect();
        if port_list.len() != 1 && port_list.len() != host_list.len() {
            return Err(invalid(format!(
                "{} hosts but {} ports: give one port for all, or one per host",
                host_list.len(),
                port_list.len()
            )));
        }
        let mut hosts = Vec::with_capacity(host_list.len());
        for (i, h) in host_list.iter().enumerate() {
            let p = port_list
                .get(i)
                .or(port_list.first())
                .copied()
                .unwrap_or("");
            hosts.push((host_of(h.trim()), port_of(p.trim())?));
        }
        let (host, port) = hosts[0].clone();
        let target_session_attrs = match raw.target_session_attrs.as_deref() {
            None | Some("") => TargetSessionAttrs::Any,
            Some(t) => TargetSessionAttrs::parse(t).ok_or_else(|| {
                invalid(format!(
                    "unsupported target_session_attrs {t:?} (supported: any, read-write, primary)"
                ))
            })?,
        };
        let user = match raw.user {
            Some(u) if !u.is_empty() => u,
            _ => std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into()),
        };
        let dbname = match raw.dbname {
            Some(d) if !d.is_empty() => d,
            _ => user.clone(),
        };
        let sslmode = match raw.sslmode.as_deref() {
            None | Some("") => SslMode::Prefer,
            Some(s) => SslMode::parse(s).ok_or_else(|| {
                invalid(format!(
                    "invalid sslmode {s:?} (one of disable, allow, prefer, require, verify-ca, verify-full)"
                ))
            })?,
        };
        let connect_timeout = match raw.connect_timeout.as_deref() {
            None | Some("") | Some("0") => DEFAULT_CONNECT_TIMEOUT,
            Some(s) => s
                .parse::<u64>()
                .map(|s| Duration::from_secs(s.max(2)))
                .map_err(|_| invalid(format!("invalid connect_timeout {s:?} (seconds)")))?,
        };
        let password = password_override.or(raw.password.filter(|p| !p.is_empty()));
        let path = |p: Option<String>| p.filter(|p| !p.is_empty()).map(PathBuf::from);
        let sslrootcert = match raw.sslrootcert.as_deref() {
            None | Some("") => None,
            Some("system") => Some(RootCert::System),
            Some(p) => Some(RootCert::File(PathBuf::from(p))),
        };
        Ok(ConnectionSettings {
            host,
            port,
            hosts,
            target_session_attrs,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            sslcert: path(raw.sslcert),
            sslkey: path(raw.sslkey),
            application_name: raw
                .application_name
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.into()),
            connect_timeout,
        })
    }

    /// `host:port` or the unix socket path, for error messages.
    pub fn target(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => self
                .socket_path()
                .unwrap_or(dir.clone())
                .display()
                .to_string(),
        }
    }

    /// The settings for each server named, in the order to try them: each
    /// has `host`/`port` set to one server (and `hosts` to that one alone).
    pub fn candidates(&self) -> Vec<ConnectionSettings> {
        self.hosts
            .iter()
            .map(|(host, port)| ConnectionSettings {
                host: host.clone(),
                port: *port,
                hosts: vec![(host.clone(), *port)],
                ..self.clone()
            })
            .collect()
    }

    /// Runs `connect` on each of [`Self::candidates`] in order until one
    /// succeeds; the error is the last host's (a [`SourceError`], or the SQL
    /// side's error built from one). The one multi-host loop of the
    /// replication connection and the SQL one (`pg::connect`).
    pub async fn connect_first<T, E, F, Fut>(&self, mut connect: F) -> Result<T, E>
    where
        F: FnMut(ConnectionSettings) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: fmt::Display + From<SourceError>,
    {
        let mut last = None;
        for candidate in self.candidates() {
            let target = candidate.target();
            match connect(candidate).await {
                Ok(conn) => return Ok(conn),
                Err(err) => {
                    if self.hosts.len() > 1 {
                        tracing::debug!(target = %target, error = %err, "trying the next PostgreSQL host");
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            SourceError::InvalidConnectionString {
                masked: self.to_string(),
                reason: "no host".into(),
            }
            .into()
        }))
    }

    /// The unix socket file, for a [`Host::Unix`].
    pub fn socket_path(&self) -> Option<PathBuf> {
        match &self.host {
            Host::Unix(dir) => Some(dir.join(format!(".s.PGSQL.{}", self.port))),
            Host::Tcp(_) => None,
        }
    }
}

/// Prints the settings as a URL with the password masked (`***`); several
/// hosts print as libpq writes them (`h1:5432,h2:5433`, unix sockets in `?host=`).
impl fmt::Display for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://{}", encode(&self.user))?;
        if self.password.is_some() {
            f.write_str(":***")?;
        }
        f.write_str("@")?;
        let all_tcp = self.hosts.iter().all(|(h, _)| matches!(h, Host::Tcp(_)));
        if all_tcp {
            for (i, (h, port)) in self.hosts.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                match h {
                    Host::Tcp(h) if h.contains(':') => write!(f, "[{h}]:{port}")?,
                    Host::Tcp(h) => write!(f, "{}:{port}", encode(h))?,
                    Host::Unix(_) => {}
                }
            }
        }
        write!(f, "/{}", encode(&self.dbname))?;
        let mut sep = '?';
        if !all_tcp {
            let hosts: Vec<String> = self
                .hosts
                .iter()
                .map(|(h, _)| match h {
                    Host::Tcp(h) => encode(h),
                    Host::Unix(dir) => encode(&dir.display().to_string()),
                })
                .collect();
            let ports: Vec<String> = self.hosts.iter().map(|(_, p)| p.to_string()).collect();
            write!(f, "{sep}host={}&port={}", hosts.join(","), ports.join(","))?;
            sep = '&';
        }
        write!(f, "{sep}sslmode={}", self.sslmode.as_str())?;
        if self.target_session_attrs != TargetSessionAttrs::Any {
            write!(
                f,
                "&target_session_attrs={}",
                self.target_session_attrs.as_str()
            )?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionSettings({self})")
    }
}

/// Masks the password of a connection string that may not even parse, for
/// error messages: `postgres://u:secret@h/db` -> `postgres://u:***@h/db`,
/// `password=secret` -> `password=***`.
pub fn mask_connection_string(conn: &str) -> String {
    if let Some(rest) = conn
        .strip_prefix("postgres://")
        .map(|r| ("postgres://", r))
        .or_else(|| {
            conn.strip_prefix("postgresql://")
                .map(|r| ("postgresql://", r))
        })
    {
        let (scheme, rest) = rest;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                if userinfo.contains(':') {
                    format!("{user}:***{}", &authority[at..])
                } else {
                    authority.to_string()
                }
            }
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some(("password", _)) => "password=***".to_string(),
                        _ => kv.to_string(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    // Keyword/value: mask the value after `password=` up to the next unquoted space.
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    while let Some(pos) = rest.find("password") {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let after_kw = &after["password".len()..];
        let trimmed = after_kw.trim_start();
        if let Some(value) = trimmed.strip_prefix('=') {
            out.push_str("password=***");
            let value = value.trim_start();
            rest = skip_value(value);
        } else {
            out.push_str("password");
            rest = after_kw;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
