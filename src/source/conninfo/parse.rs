//! The two textual forms of a connection string (URL, keyword/value) ->
//! [`Raw`] parameters, percent-encoding, and the parameters accepted.

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
pub(super) struct Raw {
    pub(super) host: Option<String>,
    pub(super) port: Option<String>,
    pub(super) user: Option<String>,
    pub(super) password: Option<String>,
    pub(super) dbname: Option<String>,
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
    pub(super) sslcert: Option<String>,
    pub(super) sslkey: Option<String>,
    pub(super) application_name: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) target_session_attrs: Option<String>,
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

/// Skips one keyword/value value (quoted or bare), returning what follows it.
pub(super) fn skip_value(s: &str) -> &str {
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

pub(super) fn parse_url(conn: &str) -> Result<Raw, String> {
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

pub(super) fn parse_keyword_value(conn: &str) -> Result<Raw, String> {
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
pub(super) fn encode(s: &str) -> String {
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
