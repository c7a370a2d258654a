//! The ordinary SQL connection next to the replication one (tokio-postgres):
//! catalog checks, slot state, publication existence, logical messages. Opened
//! from the same [`ConnectionSettings`] with the same pinned session settings
//! and the same TLS setup ([`super::tls`]) as the replication connection.

use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::connection::PINNED_OPTIONS;
use super::conninfo::{ConnectionSettings, Host, TargetSessionAttrs};
use super::error::SourceError;
use crate::lsn::Lsn;

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

/// A slot's row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// The PID streaming it, if any.
    pub active_pid: Option<i32>,
    /// Up to where the consumer confirmed.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The oldest WAL the slot still needs.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of being lost.
    pub safe_wal_size: Option<i64>,
    /// Whether the slot is temporary.
    pub temporary: bool,
}

impl SlotInfo {
    /// `wal_status = 'lost'`: the slot can no longer stream.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// Opens a SQL connection from the settings (unix sockets via `host_path`).
/// Several hosts are tried in order; with `target_session_attrs=read-write`
/// a read-only server (a standby) is skipped. The error is the last host's.
pub async fn connect_sql(settings: &ConnectionSettings) -> Result<SqlClient, SourceError> {
    let mut last = None;
    for candidate in settings.candidates() {
        let attempt = async {
            let client = connect_sql_one(&candidate).await?;
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
                    });
                }
            }
            Ok(client)
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            Err(err) => {
                if settings.hosts.len() > 1 {
                    tracing::debug!(target = %candidate.target(), error = %err, "trying the next PostgreSQL host");
                }
                last = Some(err);
            }
        }
    }
    Err(
        last.unwrap_or_else(|| SourceError::InvalidConnectionString {
            masked: settings.to_string(),
            reason: "no host".into(),
        }),
    )
}

async fn connect_sql_one(settings: &ConnectionSettings) -> Result<SqlClient, SourceError> {
    let url = settings.to_string();
    let tls = super::tls::setup(settings)?;
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
    let failed = |source| sql_error(source, "connect", &url, &settings.user, settings);
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

fn sql_error(
    source: tokio_postgres::Error,
    during: &str,
    url: &str,
    user: &str,
    settings: &ConnectionSettings,
) -> SourceError {
    if let Some(db) = source.as_db_error() {
        if matches!(db.code().code(), "28P01" | "28000") {
            let server = super::error::ServerError {
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            };
            return super::error::classify(server, during, url, user, None, None);
        }
    }
    if during == "connect" && source.as_db_error().is_none() {
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
            };
        }
        if text.contains("TLS handshake") {
            return SourceError::TlsHandshake {
                target: settings.target(),
                url: url.to_string(),
                reason,
            };
        }
        if let Some(io) =
            std::error::Error::source(&source).and_then(|s| s.downcast_ref::<std::io::Error>())
        {
            return SourceError::Connect {
                target: settings.target(),
                url: url.to_string(),
                source: std::io::Error::new(io.kind(), io.to_string()),
            };
        }
    }
    SourceError::Sql {
        during: during.to_string(),
        url: url.to_string(),
        source,
    }
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

    fn err(&self, during: &str, source: tokio_postgres::Error) -> SourceError {
        SourceError::Sql {
            during: during.to_string(),
            url: self.url.clone(),
            source,
        }
    }

    /// `current_setting('server_version_num')`.
    pub async fn server_version_num(&self) -> Result<u32, SourceError> {
        let during = "read server_version_num";
        let row = self
            .client
            .query_one("SELECT current_setting('server_version_num')", &[])
            .await
            .map_err(|e| self.err(during, e))?;
        let v: String = row.try_get(0).map_err(|e| self.err(during, e))?;
        Ok(v.trim().parse().unwrap_or(0))
    }

    /// `current_setting('wal_level')`.
    pub async fn wal_level(&self) -> Result<String, SourceError> {
        let during = "read wal_level";
        let row = self
            .client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(|e| self.err(during, e))?;
        row.try_get(0).map_err(|e| self.err(during, e))
    }

    /// The slot's state, or `None` when it does not exist.
    pub async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
        let during = "read pg_replication_slots";
        let row = self
            .client
            .query_opt(
                "SELECT active_pid, confirmed_flush_lsn::text, restart_lsn::text, wal_status, \
                 safe_wal_size, temporary FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| self.err(during, e))?;
        let Some(row) = row else { return Ok(None) };
        let lsn = |i: usize| -> Result<Option<Lsn>, SourceError> {
            let s: Option<String> = row.try_get(i).map_err(|e| self.err(during, e))?;
            Ok(s.and_then(|s| s.parse().ok()))
        };
        Ok(Some(SlotInfo {
            active_pid: row.try_get(0).map_err(|e| self.err(during, e))?,
            confirmed_flush_lsn: lsn(1)?,
            restart_lsn: lsn(2)?,
            wal_status: row.try_get(3).map_err(|e| self.err(during, e))?,
            safe_wal_size: row.try_get(4).map_err(|e| self.err(during, e))?,
            temporary: row.try_get(5).map_err(|e| self.err(during, e))?,
        }))
    }

    /// Checks the slot exists and is not lost (before `START_REPLICATION`).
    pub async fn check_slot(&self, slot: &str) -> Result<SlotInfo, SourceError> {
        match self.slot_info(slot).await? {
            None => Err(SourceError::SlotMissing {
                slot: slot.to_string(),
                url: self.url.clone(),
            }),
            Some(info) if info.is_lost() => Err(SourceError::SlotLost {
                slot: slot.to_string(),
                url: self.url.clone(),
                server: None,
            }),
            Some(info) => Ok(info),
        }
    }

    /// Whether the publication exists.
    pub async fn publication_exists(&self, publication: &str) -> Result<bool, SourceError> {
        let during = "read pg_publication";
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

    /// Fails with [`SourceError::PublicationMissing`] when it does not exist.
    pub async fn check_publication(&self, publication: &str) -> Result<(), SourceError> {
        if self.publication_exists(publication).await? {
            Ok(())
        } else {
            Err(SourceError::PublicationMissing {
                publication: publication.to_string(),
                url: self.url.clone(),
            })
        }
    }

    /// `pg_logical_emit_message(transactional, prefix, content)`; returns its LSN.
    pub async fn emit_message(
        &self,
        transactional: bool,
        prefix: &str,
        content: &str,
    ) -> Result<Lsn, SourceError> {
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
        lsn.parse().map_err(|_| SourceError::Protocol {
            during: during.into(),
            url: self.url.clone(),
            reason: format!("not an LSN: {lsn:?}"),
        })
    }

    /// Backends other than `exclude_pid` with a transaction id or snapshot:
    /// what slot creation waits for.
    pub async fn transactions_blocking_slot_creation(
        &self,
        exclude_pid: i32,
    ) -> Result<Vec<i32>, SourceError> {
        let during = "read pg_stat_activity";
        let rows = self
            .client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND pid <> $1 \
                 AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) ORDER BY xact_start",
                &[&exclude_pid],
            )
            .await
            .map_err(|e| self.err(during, e))?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(|e| self.err(during, e)))
            .collect()
    }
}
