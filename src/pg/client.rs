//! The one way to open a SQL connection (tokio-postgres) to PostgreSQL: from
//! the replication connection's [`ConnectionSettings`], with the same pinned
//! session settings ([`PINNED_OPTIONS`]) and the same TLS setup
//! ([`crate::source::tls`]). Every caller uses [`connect`] (settings already
//! parsed) or [`connect_url`] (a config's URL and password): the worker's side
//! tasks, the visibility checks, `check`, `setup`, `status`, `record`, `demo`.
//!
//! Everything here fails with [`PgError`]: connection failures as the
//! replication connection's [`SourceError`]s (a retry class, the fix in the
//! message), except a refusal by the server other than authentication (a
//! missing database, too many connections), which is classified by its
//! SQLSTATE like [`SqlClient`]'s statements and the catalog reads in
//! [`super::catalog`] and [`super::failover`], with the URL they ran on.

use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PgError;
use crate::lsn::Lsn;
use crate::source::connection::PINNED_OPTIONS;
use crate::source::conninfo::{ConnectionSettings, Host, TargetSessionAttrs};
use crate::source::error::{ServerError, SourceError};

/// A connected SQL client; the connection task ends when it is dropped.
pub struct SqlClient {
    client: tokio_postgres::Client,
    url: String,
    _connection: JoinHandle<()>,
}

impl std::fmt::Debug for SqlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlClient").field("url", &self.url).finish()
    }
}

/// Opens a SQL connection from the settings (unix sockets via `host_path`).
/// Several hosts are tried in order; with `target_session_attrs=read-write`
/// a read-only server (a standby) is skipped. The error is the last host's.
pub async fn connect(settings: &ConnectionSettings) -> Result<SqlClient, PgError> {
    settings
        .connect_first(|candidate| async move {
            let client = connect_one(&candidate).await?;
            if candidate.target_session_attrs == TargetSessionAttrs::ReadWrite {
                let read_only = client
                    .client
                    .query_one("SHOW transaction_read_only", &[])
                    .await
                    .map_err(|e| client.err("SHOW transaction_read_only", e))?;
                if read_only.get::<_, &str>(0) != "off" {
                    return Err(SourceError::NotReadWrite {
                        target: candidate.target(),
                        url: client.url.clone(),
                    }
                    .into());
                }
            }
            Ok(client)
        })
        .await
}

/// Parses `url` (a libpq URL or `key=value` string; `host=/socket/dir` for
/// unix sockets) and connects as [`connect`] does; `password`, when given,
/// overrides the one in `url`.
pub async fn connect_url(url: &str, password: Option<&str>) -> Result<SqlClient, PgError> {
    let settings = ConnectionSettings::parse(url, password.map(str::to_owned))?;
    connect(&settings).await
}

async fn connect_one(settings: &ConnectionSettings) -> Result<SqlClient, PgError> {
    let url = settings.to_string();
    let tls = crate::source::tls::setup(settings)?;
    let mut config = tokio_postgres::Config::new();
    match &settings.host {
        Host::Tcp(h) => config.host(h),
        Host::Unix(dir) => config.host_path(dir),
    };
    config
        .port(settings.port)
        .user(&settings.user)
        .dbname(&settings.dbname)
        .application_name(&settings.application_name)
        .options(PINNED_OPTIONS)
        .connect_timeout(settings.connect_timeout);
    if let Some(pw) = &settings.password {
        config.password(pw);
    }
    let log_url = url.clone();
    let failed = |source| connect_error(source, &url, settings);
    let (client, handle) = match tls {
        None => {
            config.ssl_mode(PgSslMode::Disable);
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            (client, spawn_connection(connection, log_url))
        }
        Some(tls) => {
            config.ssl_mode(if tls.optional {
                PgSslMode::Prefer
            } else {
                PgSslMode::Require
            });
            let make = MakeRustlsConnect::new((*tls.config).clone());
            let (client, connection) = config.connect(make).await.map_err(failed)?;
            (client, spawn_connection(connection, log_url))
        }
    };
    Ok(SqlClient {
        client,
        url,
        _connection: handle,
    })
}

/// Drives the connection in a task; it ends when the client is dropped.
fn spawn_connection<S, T>(
    connection: tokio_postgres::Connection<S, T>,
    url: String,
) -> JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(url = %url, %error, "SQL connection ended");
        }
    })
}

/// A failed connection attempt as the replication connection would report
/// it (authentication, TLS, an unreachable server); other failures (a
/// missing database, too many connections) as a failed statement.
fn connect_error(
    source: tokio_postgres::Error,
    url: &str,
    settings: &ConnectionSettings,
) -> PgError {
    if let Some(db) = source.as_db_error() {
        if matches!(db.code().code(), "28P01" | "28000") {
            let server = ServerError {
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            };
            return crate::source::error::classify(
                server,
                "connect",
                url,
                &settings.user,
                None,
                None,
            )
            .into();
        }
    }
    if source.as_db_error().is_none() {
        let text = source.to_string();
        let mut reason = String::new();
        let mut cause = std::error::Error::source(&source);
        while let Some(c) = cause {
            reason = c.to_string();
            cause = c.source();
        }
        if reason.contains("server does not support TLS") {
            return SourceError::TlsRefused {
                target: settings.target(),
                sslmode: settings.sslmode.as_str(),
                url: url.to_string(),
            }
            .into();
        }
        if text.contains("TLS handshake") {
            return SourceError::TlsHandshake {
                target: settings.target(),
                url: url.to_string(),
                reason,
            }
            .into();
        }
        if let Some(io) =
            std::error::Error::source(&source).and_then(|s| s.downcast_ref::<std::io::Error>())
        {
            return SourceError::Connect {
                target: settings.target(),
                url: url.to_string(),
                source: std::io::Error::new(io.kind(), io.to_string()),
            }
            .into();
        }
    }
    PgError::query("connecting", source).at(url)
}

impl SqlClient {
    /// The tokio-postgres client, for queries this module has no helper for.
    /// Takes the client; the connection task keeps running until it is dropped.
    pub fn into_client(self) -> tokio_postgres::Client {
        self.client
    }

    /// The tokio-postgres client (borrowed).
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// The masked URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A failed statement of this connection, naming its URL.
    pub fn err(&self, what: impl Into<String>, source: tokio_postgres::Error) -> PgError {
        PgError::query(what, source).at(&self.url)
    }

    /// `current_setting('wal_level')`.
    pub async fn wal_level(&self) -> Result<String, PgError> {
        let during = "reading wal_level";
        let row = self
            .client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(|e| self.err(during, e))?;
        row.try_get(0).map_err(|e| self.err(during, e))
    }

    /// Whether the publication exists.
    pub async fn publication_exists(&self, publication: &str) -> Result<bool, PgError> {
        let during = format!("reading publication {publication:?}");
        let row = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(|e| self.err(during, e))?;
        Ok(row.is_some())
    }

    /// Fails with [`SourceError::PublicationMissing`] (what the replication
    /// connection reports for it too) when it does not exist.
    pub async fn check_publication(&self, publication: &str) -> Result<(), PgError> {
        if self.publication_exists(publication).await? {
            Ok(())
        } else {
            Err(SourceError::PublicationMissing {
                publication: publication.to_string(),
                url: self.url.clone(),
            }
            .into())
        }
    }

    /// `pg_logical_emit_message(transactional, prefix, content)`; returns its LSN.
    pub async fn emit_message(
        &self,
        transactional: bool,
        prefix: &str,
        content: &str,
    ) -> Result<Lsn, PgError> {
        let during = "pg_logical_emit_message";
        let row = self
            .client
            .query_one(
                "SELECT pg_logical_emit_message($1, $2::text, $3::text)::text",
                &[&transactional, &prefix, &content],
            )
            .await
            .map_err(|e| self.err(during, e))?;
        let lsn: String = row.try_get(0).map_err(|e| self.err(during, e))?;
        lsn.parse().map_err(|_| PgError::Answer {
            what: during.into(),
            url: self.url.clone(),
            reason: format!("not an LSN: {lsn:?}"),
        })
    }

    /// Backends other than `exclude_pid` (and this connection) holding a
    /// transaction id or snapshot, oldest transaction first: what a slot
    /// creation started by `exclude_pid` waits for.
    pub async fn blocking_transactions(
        &self,
        exclude_pid: i32,
    ) -> Result<Vec<BlockingTransaction>, PgError> {
        let during = "reading the transactions in pg_stat_activity";
        let rows = self
            .client
            .query(
                "SELECT pid, coalesce(application_name, ''), coalesce(state, ''), \
                        coalesce(extract(epoch FROM now() - xact_start)::int8, 0) \
                 FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND pid <> $1 \
                   AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) ORDER BY xact_start",
                &[&exclude_pid],
            )
            .await
            .map_err(|e| self.err(during, e))?;
        rows.iter()
            .map(|r| {
                Ok(BlockingTransaction {
                    pid: r.try_get(0)?,
                    application_name: r.try_get(1)?,
                    state: r.try_get(2)?,
                    xact_seconds: r.try_get(3)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| self.err(during, e))
    }
}

/// A backend a slot creation waits for (a row of `pg_stat_activity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockingTransaction {
    /// Its PID.
    pub pid: i32,
    /// `application_name` (empty when unset).
    pub application_name: String,
    /// `state` (`active`, `idle in transaction`, ...).
    pub state: String,
    /// Seconds since its transaction started.
    pub xact_seconds: i64,
}
