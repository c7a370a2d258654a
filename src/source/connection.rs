//! The replication connection: socket (TCP, TLS over TCP after an SSLRequest,
//! or unix), startup with `replication=database` and the pinned
//! session settings, authentication (trust, cleartext, MD5, SCRAM-SHA-256), and
//! simple-protocol commands (`IDENTIFY_SYSTEM`, `SHOW`, slot commands).
//!
//! This type owns the socket and the read buffer; framing is the pure
//! [`super::frame`] splitter. Backend messages other than the CopyBoth ones go
//! through `postgres-protocol`'s parser.
//!
//! Why this file is long (~730 lines): it owns one socket through its whole
//! life (connect, TLS upgrade, startup, the four authentication methods,
//! simple-protocol commands, close), and each phase reads and writes the same
//! buffer and connection state; the pure parts are already elsewhere
//! (`frame`, `copyboth`, `conninfo`), and its unit tests in
//! `connection/tests.rs`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::conninfo::{ConnectionSettings, Host, TargetSessionAttrs};
use super::error::{classify, ServerError, SourceError};
use super::frame::{self, Frame};
use crate::lsn::Lsn;

/// Bytes asked of the socket per read: large reads let the walsender batch its writes.
pub const READ_CHUNK: usize = 256 * 1024;

/// The pinned session settings (startup `options`): how values render in text.
pub const PINNED_OPTIONS: &str =
    "-c DateStyle=ISO -c IntervalStyle=postgres -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex";

/// Oldest supported server (`server_version_num`).
pub const MIN_SERVER_VERSION_NUM: u32 = 140_000;

/// The transport.
pub enum Io {
    /// TCP.
    Tcp(TcpStream),
    /// TLS over TCP (boxed: the rustls state is large).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Unix domain socket.
    Unix(UnixStream),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database connected to.
    pub dbname: Option<String>,
}

/// Rows of a simple query: text values or NULL.
pub type TextRows = Vec<Vec<Option<String>>>;

/// A replication connection (`replication=database`), authenticated and idle.
pub struct ReplicationConnection {
    pub(crate) io: Io,
    pub(crate) read_buf: BytesMut,
    pub(crate) write_buf: BytesMut,
    settings: ConnectionSettings,
    url: String,
    server_version: String,
    server_version_num: u32,
    backend_pid: i32,
    wal_sender_timeout: Duration,
    pub(crate) poisoned: bool,
    /// The publication streamed, once `START_REPLICATION` succeeded: the
    /// stream recognises PostgreSQL 18's "skipped loading publication" by it.
    pub(crate) publication: Option<String>,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("url", &self.url)
            .field("backend_pid", &self.backend_pid)
            .field("server_version", &self.server_version)
            .finish()
    }
}

/// Connects, authenticates and checks the server: version 14 or later,
/// `wal_level = logical`. Reads `wal_sender_timeout` for the status interval.
/// Several hosts are tried in order, each under `connect_timeout`; with
/// `target_session_attrs=read-write` a read-only server (a standby) is
/// skipped. The error is the last host's.
pub async fn connect(settings: &ConnectionSettings) -> Result<ReplicationConnection, SourceError> {
    settings
        .connect_first(|candidate| async move { connect_one(&candidate).await })
        .await
}

async fn connect_one(settings: &ConnectionSettings) -> Result<ReplicationConnection, SourceError> {
    let url = settings.to_string();
    let timeout = settings.connect_timeout;
    match tokio::time::timeout(timeout, connect_inner(settings, url.clone())).await {
        Ok(r) => r,
        Err(_) => Err(SourceError::ConnectTimeout {
            target: settings.target(),
            url,
            timeout,
        }),
    }
}

async fn connect_inner(
    settings: &ConnectionSettings,
    url: String,
) -> Result<ReplicationConnection, SourceError> {
    let io =
        match &settings.host {
            Host::Tcp(host) => {
                let s = TcpStream::connect((host.as_str(), settings.port))
                    .await
                    .map_err(|source| SourceError::Connect {
                        target: settings.target(),
                        url: url.clone(),
                        source,
                    })?;
                let _ = s.set_nodelay(true);
                match super::tls::setup(settings)? {
                    Some(tls) => negotiate_tls(s, host, settings, &url, &tls).await?,
                    None => Io::Tcp(s),
                }
            }
            Host::Unix(_) => {
                let path = settings.socket_path().unwrap_or_default();
                Io::Unix(UnixStream::connect(&path).await.map_err(|source| {
                    SourceError::Connect {
                        target: settings.target(),
                        url: url.clone(),
                        source,
                    }
                })?)
            }
        };
    let mut conn = ReplicationConnection {
        io,
        read_buf: BytesMut::with_capacity(READ_CHUNK),
        write_buf: BytesMut::new(),
        settings: settings.clone(),
        url,
        server_version: String::new(),
        server_version_num: 0,
        backend_pid: 0,
        wal_sender_timeout: Duration::from_secs(60),
        poisoned: false,
        publication: None,
    };
    conn.startup().await?;
    // Before the server checks: a standby's settings (wal_level) are not the
    // primary's, and it is skipped anyway.
    if settings.target_session_attrs == TargetSessionAttrs::ReadWrite
        && conn.show("transaction_read_only").await? != "off"
    {
        let url = conn.url.clone();
        conn.close().await;
        return Err(SourceError::NotReadWrite {
            target: settings.target(),
            url,
        });
    }
    conn.check_server().await?;
    tracing::debug!(url = %conn.url, backend_pid = conn.backend_pid, server_version = %conn.server_version, "replication connection ready");
    Ok(conn)
}

/// SSLRequest, then the rustls handshake when the server answers 'S'. An 'N'
/// is plaintext under `sslmode=prefer` and an error otherwise. Exactly one
/// byte is read before the handshake, so nothing sent in plaintext can be
/// mistaken for part of the TLS stream.
async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    settings: &ConnectionSettings,
    url: &str,
    tls: &super::tls::TlsSetup,
) -> Result<Io, SourceError> {
    let lost = |source: io::Error| SourceError::Connect {
        target: settings.target(),
        url: url.to_string(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(lost)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(lost)?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.optional => {
            tracing::debug!(url = %url, "the server declined TLS; sslmode=prefer continues in plaintext");
            return Ok(Io::Tcp(tcp));
        }
        b'N' => {
            return Err(SourceError::TlsRefused {
                target: settings.target(),
                sslmode: settings.sslmode.as_str(),
                url: url.to_string(),
            })
        }
        other => {
            return Err(SourceError::Protocol {
                during: "SSLRequest".into(),
                url: url.to_string(),
                reason: format!("unexpected answer byte {other:#04x} to SSLRequest"),
            })
        }
    }
    let name = super::tls::server_name(host).map_err(|reason| SourceError::TlsConfig {
        url: url.to_string(),
        reason,
    })?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&tls.config));
    match connector.connect(name, tcp).await {
        Ok(s) => Ok(Io::Tls(Box::new(s))),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(SourceError::TlsHandshake {
            target: settings.target(),
            url: url.to_string(),
            reason: e.to_string(),
        }),
        Err(e) => Err(lost(e)),
    }
}

impl ReplicationConnection {
    /// The masked URL, for logs and errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The settings connected with.
    pub fn settings(&self) -> &ConnectionSettings {
        &self.settings
    }

    /// `server_version` as the server reported it at startup.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// `server_version_num`, e.g. 150004.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// The walsender's PID (for `pg_terminate_backend` and logs).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// `wal_sender_timeout` (zero: disabled).
    pub fn wal_sender_timeout(&self) -> Duration {
        self.wal_sender_timeout
    }

    /// How often to send status updates: min(10 s, wal_sender_timeout / 3);
    /// 10 s when the timeout is disabled.
    pub fn status_interval(&self) -> Duration {
        status_interval(self.wal_sender_timeout)
    }

    pub(crate) fn server_error(
        &self,
        server: ServerError,
        during: &str,
        slot: Option<&str>,
        publication: Option<&str>,
    ) -> SourceError {
        classify(
            server,
            during,
            &self.url,
            &self.settings.user,
            slot,
            publication,
        )
    }

    pub(crate) fn lost(&self, during: &str, source: Option<io::Error>) -> SourceError {
        SourceError::ConnectionLost {
            during: during.to_string(),
            url: self.url.clone(),
            lsn: None,
            source,
        }
    }

    pub(crate) fn protocol(&self, during: &str, reason: impl Into<String>) -> SourceError {
        SourceError::Protocol {
            during: during.to_string(),
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) async fn flush_writes(&mut self, during: &str) -> Result<(), SourceError> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        let buf = self.write_buf.split();
        if let Err(e) = self.io.write_all(&buf).await {
            return Err(self.lost(during, Some(e)));
        }
        Ok(())
    }

    /// Reads one frame, reading the socket as needed.
    pub(crate) async fn read_frame(&mut self, during: &str) -> Result<Frame, SourceError> {
        loop {
            match frame::split_frame(&mut self.read_buf) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(during, e.to_string())),
            }
            self.fill_read_buf(during).await?;
        }
    }

    /// One socket read into the buffer (a big one).
    pub(crate) async fn fill_read_buf(&mut self, during: &str) -> Result<(), SourceError> {
        let want = frame::bytes_missing(&self.read_buf).max(READ_CHUNK);
        self.read_buf.reserve(want.min(READ_CHUNK * 16));
        match self.io.read_buf(&mut self.read_buf).await {
            Ok(0) => Err(self.lost(during, None)),
            Ok(_) => Ok(()),
            Err(e) => Err(self.lost(during, Some(e))),
        }
    }

    /// Parses a frame we do not handle ourselves with postgres-protocol.
    pub(crate) fn parse_message(
        &self,
        frame: Frame,
        during: &str,
    ) -> Result<backend::Message, SourceError> {
        let mut raw = frame.raw;
        match backend::Message::parse(&mut raw) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(self.protocol(during, "truncated message")),
            Err(e) => Err(self.protocol(during, e.to_string())),
        }
    }

    async fn startup(&mut self) -> Result<(), SourceError> {
        let s = &self.settings;
        let params: [(&str, &str); 6] = [
            ("user", &s.user),
            ("database", &s.dbname),
            ("replication", "database"),
            ("application_name", &s.application_name),
            ("client_encoding", "UTF8"),
            ("options", PINNED_OPTIONS),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)
            .map_err(|e| self.protocol("startup", e.to_string()))?;
        self.flush_writes("startup").await?;
        self.authenticate().await?;
        // After AuthenticationOk: ParameterStatus*, BackendKeyData, ReadyForQuery.
        loop {
            let f = self.read_frame("startup").await?;
            if f.tag == frame::ERROR_RESPONSE {
                return Err(self.error_frame(&f, "startup", None, None));
            }
            match self.parse_message(f, "startup")? {
                backend::Message::ParameterStatus(p) => {
                    let (name, value) = (
                        p.name()
                            .map_err(|e| self.protocol("startup", e.to_string()))?,
                        p.value()
                            .map_err(|e| self.protocol("startup", e.to_string()))?,
                    );
                    if name == "server_version" {
                        self.server_version = value.to_string();
                        self.server_version_num = parse_server_version(value).unwrap_or(0);
                    }
                }
                backend::Message::BackendKeyData(k) => self.backend_pid = k.process_id(),
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                _ => return Err(self.protocol("startup", "unexpected message")),
            }
        }
    }

    pub(crate) fn error_frame(
        &self,
        f: &Frame,
        during: &str,
        slot: Option<&str>,
        publication: Option<&str>,
    ) -> SourceError {
        match ServerError::parse(f.body()) {
            Some(server) => self.server_error(server, during, slot, publication),
            None => self.protocol(during, "malformed ErrorResponse"),
        }
    }

    async fn authenticate(&mut self) -> Result<(), SourceError> {
        let during = "authentication";
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let f = self.read_frame(during).await?;
            if f.tag == frame::ERROR_RESPONSE {
                return Err(self.error_frame(&f, during, None, None));
            }
            match self.parse_message(f, during)? {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = self.password("password")?;
                    frontend::password_message(pw.as_bytes(), &mut self.write_buf)
                        .map_err(|e| self.protocol(during, e.to_string()))?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = self.password("md5")?;
                    let hash = md5_hash(self.settings.user.as_bytes(), pw.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)
                        .map_err(|e| self.protocol(during, e.to_string()))?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut offers_scram = false;
                    let mut mechs = body.mechanisms();
                    while let Some(m) = mechs
                        .next()
                        .map_err(|e| self.protocol(during, e.to_string()))?
                    {
                        offers_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !offers_scram {
                        return Err(SourceError::UnsupportedAuthentication {
                            method: "SASL without SCRAM-SHA-256".into(),
                            url: self.url.clone(),
                        });
                    }
                    let pw = self.password("scram-sha-256")?;
                    // No channel binding (SCRAM-SHA-256, not -PLUS), over TLS too.
                    let s =
                        sasl::ScramSha256::new(pw.as_bytes(), sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.write_buf,
                    )
                    .map_err(|e| self.protocol(during, e.to_string()))?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let url = self.url.clone();
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol(during, "SASL continue without SASL start"))?;
                    s.update(body.data())
                        .map_err(|source| SourceError::Scram { url, source })?;
                    let msg = s.message().to_vec();
                    frontend::sasl_response(&msg, &mut self.write_buf)
                        .map_err(|e| self.protocol(during, e.to_string()))?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let url = self.url.clone();
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol(during, "SASL final without SASL start"))?;
                    s.finish(body.data())
                        .map_err(|source| SourceError::Scram { url, source })?;
                }
                backend::Message::AuthenticationKerberosV5 => {
                    return Err(self.unsupported_auth("Kerberos V5"))
                }
                backend::Message::AuthenticationScmCredential => {
                    return Err(self.unsupported_auth("SCM credential"))
                }
                backend::Message::AuthenticationGss
                | backend::Message::AuthenticationGssContinue(_) => {
                    return Err(self.unsupported_auth("GSSAPI"))
                }
                backend::Message::AuthenticationSspi => return Err(self.unsupported_auth("SSPI")),
                backend::Message::NoticeResponse(_) => {}
                _ => return Err(self.protocol(during, "unexpected message")),
            }
            self.flush_writes(during).await?;
        }
    }

    fn unsupported_auth(&self, method: &str) -> SourceError {
        SourceError::UnsupportedAuthentication {
            method: method.into(),
            url: self.url.clone(),
        }
    }

    fn password(&self, method: &'static str) -> Result<String, SourceError> {
        self.settings
            .password
            .clone()
            .ok_or_else(|| SourceError::PasswordRequired {
                user: self.settings.user.clone(),
                method,
                url: self.url.clone(),
            })
    }

    async fn check_server(&mut self) -> Result<(), SourceError> {
        if self.server_version_num == 0 {
            let v = self.show("server_version_num").await?;
            self.server_version_num = v.trim().parse().unwrap_or(0);
        }
        if self.server_version_num < MIN_SERVER_VERSION_NUM {
            return Err(SourceError::ServerTooOld {
                version: self.server_version.clone(),
                url: self.url.clone(),
            });
        }
        let wal_level = self.show("wal_level").await?;
        if wal_level != "logical" {
            return Err(SourceError::WalLevelNotLogical {
                wal_level,
                url: self.url.clone(),
            });
        }
        let timeout = self.show("wal_sender_timeout").await?;
        self.wal_sender_timeout = parse_pg_duration(&timeout).unwrap_or(Duration::from_secs(60));
        Ok(())
    }

    /// `SHOW name` over the replication connection.
    pub async fn show(&mut self, name: &str) -> Result<String, SourceError> {
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
        {
            return Err(self.protocol("SHOW", format!("invalid setting name {name:?}")));
        }
        let sql = format!("SHOW {name}");
        let rows = self.simple_query(&sql, None, None).await?;
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .ok_or_else(|| self.protocol(&sql, "no value"))
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM", None, None).await?;
        let row = rows
            .into_iter()
            .next()
            .filter(|r| r.len() >= 3)
            .ok_or_else(|| self.protocol("IDENTIFY_SYSTEM", "expected one row of 4 columns"))?;
        let bad = |what: &str| self.protocol("IDENTIFY_SYSTEM", format!("bad {what}"));
        Ok(SystemIdentity {
            system_id: row[0].clone().ok_or_else(|| bad("systemid"))?,
            timeline: row[1]
                .as_deref()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlogpos: row[2]
                .as_deref()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// Runs one command with the simple query protocol and collects its rows as
    /// text. `slot`/`publication` name what the command is about, for errors.
    pub async fn simple_query(
        &mut self,
        sql: &str,
        slot: Option<&str>,
        publication: Option<&str>,
    ) -> Result<TextRows, SourceError> {
        if self.poisoned {
            return Err(SourceError::Poisoned {
                url: self.url.clone(),
            });
        }
        // Poisoned until the command completes: if this future is dropped
        // mid-way (a timeout), the connection's state is unknown.
        self.poisoned = true;
        frontend::query(sql, &mut self.write_buf).map_err(|e| self.protocol(sql, e.to_string()))?;
        self.flush_writes(sql).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame(sql).await?;
            if f.tag == frame::ERROR_RESPONSE {
                error = Some(self.error_frame(&f, sql, slot, publication));
                continue;
            }
            match self.parse_message(f, sql)? {
                backend::Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(r) = ranges
                        .next()
                        .map_err(|e| self.protocol(sql, e.to_string()))?
                    {
                        values.push(r.map(|r| {
                            String::from_utf8_lossy(buf.get(r).unwrap_or_default()).into_owned()
                        }));
                    }
                    rows.push(values);
                }
                backend::Message::ReadyForQuery(_) => {
                    self.poisoned = false;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                backend::Message::RowDescription(_)
                | backend::Message::CommandComplete(_)
                | backend::Message::EmptyQueryResponse
                | backend::Message::NoticeResponse(_)
                | backend::Message::ParameterStatus(_) => {}
                _ => return Err(self.protocol(sql, "unexpected message")),
            }
        }
    }

    /// Sends Terminate and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush_writes("close").await;
        let _ = self.io.shutdown().await;
    }
}

/// min(10 s, wal_sender_timeout / 3); 10 s when the timeout is disabled (0).
pub fn status_interval(wal_sender_timeout: Duration) -> Duration {
    let ten = Duration::from_secs(10);
    if wal_sender_timeout.is_zero() {
        ten
    } else {
        ten.min(wal_sender_timeout / 3)
            .max(Duration::from_millis(100))
    }
}

/// How long the stream may hear nothing while it reads before it gives the
/// connection up: twice `wal_sender_timeout` (by then the server has dropped
/// the connection too and freed the slot). `None` when the timeout is
/// disabled (0): then a silent server is noticed only by TCP.
pub fn silence_limit(wal_sender_timeout: Duration) -> Option<Duration> {
    (!wal_sender_timeout.is_zero()).then(|| wal_sender_timeout * 2)
}

/// "15.4 (Debian 15.4-1)" -> 150004; "9.6.3" -> 90603; "16beta1" -> 160000.
pub fn parse_server_version(v: &str) -> Option<u32> {
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if major >= 10 {
        Some(major * 10_000 + minor)
    } else {
        let patch: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(major * 10_000 + minor * 100 + patch)
    }
}

/// A GUC duration as SHOW prints it: `60s`, `2min`, `500ms`, `1h`, `0`.
pub fn parse_pg_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    Some(match unit.trim() {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86400)?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
