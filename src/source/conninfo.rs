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

/// Parameters accepted in a connection string.
const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
];

#[derive(Default)]
struct Raw {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<String>,
    target_session_attrs: Option<String>,
}

impl Raw {
    fn set(&mut self, key: &str, value: String) -> Result<(), String> {
        let slot = match key {
            "host" | "hostaddr" => &mut self.host,
            "port" => &mut self.port,
            "user" => &mut self.user,
            "password" => &mut self.password,
            "dbname" => &mut self.dbname,
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "application_name" => &mut self.application_name,
            "connect_timeout" => &mut self.connect_timeout,
            "target_session_attrs" => &mut self.target_session_attrs,
            other => {
                return Err(format!(
                    "unsupported connection parameter {other:?} (supported: {})",
                    KNOWN.join(", ")
                ))
            }
        };
        *slot = Some(value);
        Ok(())
    }
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
    /// succeeds; the error is the last host's. The one multi-host loop of the
    /// replication connection and the SQL one (`pg::connect`).
    pub async fn connect_first<T, F, Fut>(&self, mut connect: F) -> Result<T, SourceError>
    where
        F: FnMut(ConnectionSettings) -> Fut,
        Fut: std::future::Future<Output = Result<T, SourceError>>,
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
        Err(
            last.unwrap_or_else(|| SourceError::InvalidConnectionString {
                masked: self.to_string(),
                reason: "no host".into(),
            }),
        )
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

/// Skips one keyword/value value (quoted or bare), returning what follows it.
fn skip_value(s: &str) -> &str {
    let mut chars = s.char_indices();
    if s.starts_with('\'') {
        chars.next();
        let mut escaped = false;
        for (i, c) in chars {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '\'') => return &s[i + 1..],
                _ => {}
            }
        }
        ""
    } else {
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        &s[end..]
    }
}

fn parse_url(conn: &str) -> Result<Raw, String> {
    let rest = conn
        .strip_prefix("postgresql://")
        .or_else(|| conn.strip_prefix("postgres://"))
        .ok_or("expected postgres:// or postgresql://")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut raw = Raw::default();
    let hostport = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    raw.user = Some(decode(u)?);
                    raw.password = Some(decode(p)?);
                }
                None => raw.user = Some(decode(userinfo)?),
            }
            &authority[at + 1..]
        }
        None => authority,
    };
    // `h1:p1,h2,[::1]:p3`: one list of hosts and one of ports (empty: default).
    if !hostport.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for one in hostport.split(',') {
            let (h, p) = split_host_port(one)?;
            hosts.push(h);
            ports.push(p);
        }
        raw.host = Some(hosts.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            raw.port = Some(ports.join(","));
        }
    }
    if let Some(path) = path {
        if !path.is_empty() {
            raw.dbname = Some(decode(path)?);
        }
    }
    if let Some(query) = query {
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                format!(
                    "query parameter {k:?} has no value",
                    k = decode(kv).unwrap_or_default()
                )
            })?;
            raw.set(&decode(k)?, decode(v)?)?;
        }
    }
    Ok(raw)
}

/// One `host[:port]` of a URL's authority (`[v6]:port` for IPv6): the
/// decoded host and the port text (empty when absent).
fn split_host_port(one: &str) -> Result<(String, String), String> {
    if let Some(v6) = one.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated [ in IPv6 host")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h.to_string(), p.to_string())),
            None if after.is_empty() => Ok((h.to_string(), String::new())),
            None => Err(format!("unexpected {after:?} after the IPv6 host")),
        };
    }
    match one.rsplit_once(':') {
        Some((h, p)) => Ok((decode(h)?, p.to_string())),
        None => Ok((decode(one)?, String::new())),
    }
}

fn parse_keyword_value(conn: &str) -> Result<Raw, String> {
    let mut raw = Raw::default();
    let mut rest = conn.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=').ok_or_else(|| {
            format!(
                "missing \"=\" after {:?}",
                rest.split_whitespace().next().unwrap_or("")
            )
        })?;
        let key = rest[..eq].trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("invalid keyword {key:?}"));
        }
        let value_start = rest[eq + 1..].trim_start();
        let (value, after) = if let Some(quoted) = value_start.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => break,
                    },
                    '\'' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end.ok_or_else(|| format!("unterminated quoted value of {key:?}"))?;
            (value, &quoted[end..])
        } else {
            let end = value_start
                .find(char::is_whitespace)
                .unwrap_or(value_start.len());
            let mut value = String::new();
            let mut chars = value_start[..end].chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(c) = chars.next() {
                        value.push(c);
                    }
                } else {
                    value.push(c);
                }
            }
            (value, &value_start[end..])
        };
        raw.set(key, value)?;
        rest = after.trim_start();
    }
    Ok(raw)
}

/// Percent-decodes (no `+` -> space: libpq does not do that either).
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "invalid percent-encoding".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding is not UTF-8".to_string())
}

/// Percent-encodes what would break the URL structure.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_tcp_url_with_everything() {
        let s = ConnectionSettings::parse(
            "postgres://app:s%40cret@db.example:6543/shop?sslmode=disable&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(s.host, Host::Tcp("db.example".into()));
        assert_eq!(s.port, 6543);
        assert_eq!(s.user, "app");
        assert_eq!(s.password.as_deref(), Some("s@cret"));
        assert_eq!(s.dbname, "shop");
        assert_eq!(s.sslmode, SslMode::Disable);
        assert_eq!(s.application_name, "x");
        assert_eq!(s.target(), "db.example:6543");
    }

    #[test]
    fn parses_unix_socket_url() {
        let s =
            ConnectionSettings::parse("postgres://postgres@/postgres?host=/tmp/x&port=5433", None)
                .unwrap();
        assert_eq!(s.host, Host::Unix("/tmp/x".into()));
        assert_eq!(
            s.socket_path().unwrap(),
            PathBuf::from("/tmp/x/.s.PGSQL.5433")
        );
        assert_eq!(s.application_name, DEFAULT_APPLICATION_NAME);
        let s = ConnectionSettings::parse("postgresql://%2Fvar%2Frun%2Fpg/db", None).unwrap();
        assert_eq!(s.host, Host::Unix("/var/run/pg".into()));
    }

    #[test]
    fn parses_ipv6_and_keyword_value() {
        let s = ConnectionSettings::parse("postgres://u@[::1]:5000/d", None).unwrap();
        assert_eq!(s.host, Host::Tcp("::1".into()));
        assert_eq!(s.target(), "[::1]:5000");
        let s = ConnectionSettings::parse(
            "host=127.0.0.1 port=5001 user=u password='it''s \\'q\\'' dbname = d",
            None,
        );
        // '' is not an escape in conninfo: the value ends at the second quote.
        assert!(s.is_err());
        let s = ConnectionSettings::parse(
            "host=127.0.0.1 port=5001 user=u password='a \\'b' dbname = d",
            None,
        )
        .unwrap();
        assert_eq!(s.password.as_deref(), Some("a 'b"));
        assert_eq!(s.dbname, "d");
        assert_eq!(s.port, 5001);
    }

    #[test]
    fn password_override_wins_and_is_never_printed() {
        let s =
            ConnectionSettings::parse("postgres://u:inurl@h/d", Some("fromfile".into())).unwrap();
        assert_eq!(s.password.as_deref(), Some("fromfile"));
        let shown = format!("{s} {s:?}");
        assert!(
            !shown.contains("fromfile") && !shown.contains("inurl"),
            "{shown}"
        );
        assert_eq!(s.to_string(), "postgres://u:***@h:5432/d?sslmode=prefer");
    }

    #[test]
    fn masks_passwords_everywhere() {
        assert_eq!(
            mask_connection_string("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        let m = mask_connection_string("postgres://u@h/db?password=secret&sslmode=disable");
        assert!(
            !m.contains("secret") && m.contains("sslmode=disable"),
            "{m}"
        );
        assert_eq!(
            mask_connection_string("host=/tmp password=secret user=u"),
            "host=/tmp password=*** user=u"
        );
        assert_eq!(
            mask_connection_string("host=h password = 'se cr\\'et' dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(mask_connection_string("host=h user=u"), "host=h user=u");
        assert!(!mask_connection_string("postgres://u:secret@[bad").contains("secret"));
    }

    #[test]
    fn masks_unparsable_strings() {
        assert_eq!(
            mask_connection_string("postgres://u:p%zz@h/d?password=x&a=b"),
            "postgres://u:***@h/d?password=***&a=b"
        );
        assert_eq!(
            mask_connection_string("host=h password='a b' user=u"),
            "host=h password=*** user=u"
        );
        let err = ConnectionSettings::parse("postgres://u:topsecret@h:notaport/d", None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret"), "{err}");
    }

    #[test]
    fn tls_parameters_parse_as_libpq_spells_them() {
        let s = ConnectionSettings::parse(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
            None,
        )
        .unwrap();
        assert_eq!(s.sslmode, SslMode::VerifyFull);
        assert_eq!(s.sslrootcert, Some(RootCert::File("/ca.pem".into())));
        assert_eq!(s.sslcert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(s.sslkey.as_deref(), Some(Path::new("/k.pem")));
        let s =
            ConnectionSettings::parse("sslmode=require sslrootcert=system host=h", None).unwrap();
        assert_eq!(s.sslrootcert, Some(RootCert::System));
        assert!(ConnectionSettings::parse("postgres://u@h/d?sslmode=nope", None).is_err());
        assert!(ConnectionSettings::parse("postgres://u@h/d?bogus=1", None).is_err());
    }

    #[test]
    fn several_hosts_are_tried_in_order_as_libpq_lists_them() {
        let s = ConnectionSettings::parse(
            "postgresql://u@h1:5001,h2,[::1]:5003/d?target_session_attrs=read-write",
            None,
        )
        .unwrap();
        assert_eq!(
            s.hosts,
            vec![
                (Host::Tcp("h1".into()), 5001),
                (Host::Tcp("h2".into()), DEFAULT_PORT),
                (Host::Tcp("::1".into()), 5003),
            ]
        );
        assert_eq!((s.host.clone(), s.port), (Host::Tcp("h1".into()), 5001));
        assert_eq!(s.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(
            s.to_string(),
            "postgres://u@h1:5001,h2:5432,[::1]:5003/d?sslmode=prefer&target_session_attrs=read-write"
        );
        let candidates = s.candidates();
        assert_eq!(candidates.len(), 3);
        assert_eq!(candidates[1].host, Host::Tcp("h2".into()));
        assert_eq!(candidates[1].port, DEFAULT_PORT);
        assert_eq!(candidates[1].hosts.len(), 1);
        assert_eq!(candidates[2].target(), "[::1]:5003");
        assert_eq!(
            candidates[2].target_session_attrs,
            TargetSessionAttrs::ReadWrite
        );

        // Keyword/value: one port for all hosts, or one per host.
        let s = ConnectionSettings::parse("host=a,b port=6000 user=u", None).unwrap();
        assert_eq!(
            s.hosts,
            vec![(Host::Tcp("a".into()), 6000), (Host::Tcp("b".into()), 6000)]
        );
        let s = ConnectionSettings::parse(
            "host=a,/run/pg port=6000,6001 user=u dbname=d target_session_attrs=primary",
            None,
        )
        .unwrap();
        assert_eq!(s.hosts[1], (Host::Unix("/run/pg".into()), 6001));
        assert_eq!(s.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(
            s.to_string(),
            "postgres://u@/d?host=a,%2Frun%2Fpg&port=6000,6001&sslmode=prefer&target_session_attrs=read-write"
        );
        let err = ConnectionSettings::parse("host=a,b,c port=1,2", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 hosts but 2 ports"), "{err}");
        let err = ConnectionSettings::parse("postgres://u@h/d?target_session_attrs=standby", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported target_session_attrs"), "{err}");
        // One host: as before, no list in the URL.
        let s = ConnectionSettings::parse("postgres://u@h:1/d", None).unwrap();
        assert_eq!(s.hosts, vec![(Host::Tcp("h".into()), 1)]);
        assert_eq!(s.to_string(), "postgres://u@h:1/d?sslmode=prefer");
    }
}
