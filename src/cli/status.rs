//! `cache-invalidator status [--json]`: the replication slot and publication
//! as PostgreSQL sees them, over plain SQL.
//!
//! A runtime probe: exit 0 when the slot exists (whatever its health, which
//! the output describes), exit 1 when PostgreSQL is unreachable or the slot is
//! missing (the output says to run `setup`). `--json` prints one object with
//! stable field names (see [`Status`]) in every case where it reached PostgreSQL.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::pg::catalog::{self, SlotFacts, StreamingClient};
use crate::pg::failover::{self, StandbySlot};

/// What `status --json` prints. Field names are stable.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// The slot name from the config.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// `plugin`.
    pub plugin: Option<String>,
    /// `active`: a walsender streams the slot.
    pub active: bool,
    /// `active_pid`.
    pub active_pid: Option<i32>,
    /// Whether that walsender is a cache-invalidator worker: its client's
    /// `application_name` is the one `[postgres] url` sets (by default
    /// `cache-invalidator`).
    pub streaming: bool,
    /// The worker (or other client) the walsender streams to: its
    /// `application_name`, `client_addr`, `client_hostname`, `client_port`
    /// and `backend_start` from `pg_stat_replication` (`null` when inactive).
    pub client: Option<StreamingClient>,
    /// `confirmed_flush_lsn`.
    pub confirmed_flush_lsn: Option<String>,
    /// `restart_lsn`.
    pub restart_lsn: Option<String>,
    /// `pg_current_wal_lsn()`.
    pub current_lsn: Option<String>,
    /// Bytes of WAL not yet acknowledged (`current - confirmed_flush_lsn`).
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL the slot retains (`current - restart_lsn`).
    pub retained_wal_bytes: Option<i64>,
    /// `wal_status`.
    pub wal_status: Option<String>,
    /// `safe_wal_size` (`null`: unlimited, `max_slot_wal_keep_size = -1`).
    pub safe_wal_size: Option<i64>,
    /// The publication name from the config.
    pub publication: String,
    /// Whether the publication exists.
    pub publication_exists: bool,
    /// `pubviaroot`.
    pub publish_via_partition_root: Option<bool>,
    /// Published tables, `schema.table`, sorted.
    pub publication_tables: Vec<String>,
    /// `pg_replication_slots.failover` (PostgreSQL 17+; `null` before or
    /// without a slot): the slot is synchronized to standbys that ask for it.
    pub failover: Option<bool>,
    /// `pg_replication_slots.synced` where the URL led (true on a promoted
    /// standby whose slot came through synchronization).
    pub synced: Option<bool>,
    /// `synchronized_standby_slots` (PostgreSQL 17+).
    pub synchronized_standby_slots: Option<String>,
    /// The slot on each other host of a multi-host URL that is a standby.
    pub standbys: Vec<StandbySlot>,
    /// Failover warnings (what `check` says too).
    pub warnings: Vec<String>,
    /// What to do, when something is wrong (`null` when healthy).
    pub problem: Option<String>,
    /// `[postgres] replicas`: reachability, replay position and lag of each.
    pub replicas: Vec<crate::visibility::report::ReplicaReport>,
}

/// How long `status` waits for each standby of a multi-host URL.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(5);

/// The slot on every host of the URL that is a standby (in recovery); hosts
/// that do not answer are listed as unreachable.
async fn standbys(config: &Config) -> Vec<StandbySlot> {
    let pg = &config.postgres;
    let Ok(settings) = crate::source::ConnectionSettings::parse(
        &pg.url,
        pg.password.as_ref().map(|p| p.expose().to_owned()),
    ) else {
        return Vec::new();
    };
    if settings.hosts.len() < 2 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for mut candidate in settings.candidates() {
        candidate.target_session_attrs = crate::source::TargetSessionAttrs::Any;
        candidate.connect_timeout = candidate.connect_timeout.min(STANDBY_TIMEOUT);
        let target = candidate.target();
        match crate::pg::connect(&candidate).await {
            Ok(sql) => {
                let standby = failover::read_standby(sql.client(), &target, &pg.slot).await;
                // The primary is not a standby: reported above, not here.
                if standby.error.as_deref() != Some(failover::NOT_A_STANDBY) {
                    out.push(standby);
                }
            }
            Err(e) => out.push(StandbySlot {
                target,
                reachable: false,
                error: Some(e.to_string()),
                slot_exists: false,
                synced: false,
                confirmed_flush_lsn: None,
            }),
        }
    }
    out
}

/// Runs `status`.
pub async fn run(config_path: &Path, json: bool) -> Result<(), CliError> {
    let config = Config::load(config_path, &EnvOverrides::from_env()).map_err(CliError::invalid)?;
    let status = probe(&config).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&status).map_err(CliError::runtime)?
        );
    } else {
        print!("{}", render(&status));
    }
    match &status.problem {
        Some(p) if !status.slot_exists => Err(CliError::runtime(p.clone())),
        _ => Ok(()),
    }
}

/// Reads the slot and the publication.
pub async fn probe(config: &Config) -> Result<Status, CliError> {
    let pg = &config.postgres;
    let settings = crate::source::ConnectionSettings::parse(
        &pg.url,
        pg.password.as_ref().map(|p| p.expose().to_owned()),
    )
    .map_err(|e| CliError::runtime(crate::pg::PgError::from(e)))?;
    let sql = crate::pg::connect(&settings)
        .await
        .map_err(CliError::runtime)?;
    let client = sql.client();
    let version = catalog::server_version_num(client)
        .await
        .map_err(CliError::runtime)?;
    let slot = catalog::slot(client, &pg.slot)
        .await
        .map_err(CliError::runtime)?;
    let publication = catalog::publication(client, &pg.publication, version)
        .await
        .map_err(CliError::runtime)?;
    let facts = failover::read(client, &pg.slot)
        .await
        .map_err(CliError::runtime)?;
    let warnings = failover::findings(&facts, &pg.slot, pg.failover_slot)
        .into_iter()
        .map(|f| f.message)
        .collect();
    let standbys = standbys(config).await;
    let current_lsn = match &slot {
        Some(s) => Some(s.current_lsn.clone()),
        None => catalog::current_wal_lsn(client)
            .await
            .ok()
            .flatten()
            .map(|l| l.to_string()),
    };
    let problem = match &slot {
        None => Some(format!(
            "replication slot {:?} does not exist: run `cache-invalidator setup`",
            pg.slot
        )),
        Some(s) if s.wal_status.as_deref() == Some("lost") => Some(format!(
            "replication slot {:?} lost WAL it needed (wal_status = 'lost'): changes were missed; `cache-invalidator setup` (or `run` with auto_setup) recreates it and flushes every mapped table",
            pg.slot
        )),
        Some(_) if publication.is_none() => Some(format!(
            "publication {:?} does not exist: run `cache-invalidator setup`",
            pg.publication
        )),
        Some(s) if !s.active => Some("no worker streams the slot: WAL accumulates until `cache-invalidator run` is started".to_owned()),
        _ => None,
    };
    let SlotFacts {
        plugin,
        active,
        active_pid,
        confirmed_flush_lsn,
        restart_lsn,
        lag_bytes,
        retained_wal_bytes,
        wal_status,
        safe_wal_size,
        client: streaming_client,
        ..
    } = slot.clone().unwrap_or_default();
    // Ours when it carries the application_name our config sets (by
    // default `cache-invalidator`, but a URL may name another).
    let streaming = streaming_client
        .as_ref()
        .is_some_and(|c| c.application_name.as_deref() == Some(settings.application_name.as_str()));
    let replicas = crate::visibility::report::inspect_all(
        client,
        &pg.replicas,
        pg.password.as_ref().map(|p| p.expose()),
    )
    .await;
    Ok(Status {
        slot: pg.slot.clone(),
        slot_exists: slot.is_some(),
        plugin,
        active,
        active_pid,
        streaming,
        client: streaming_client,
        confirmed_flush_lsn,
        restart_lsn,
        current_lsn,
        lag_bytes,
        retained_wal_bytes,
        wal_status,
        safe_wal_size,
        publication: pg.publication.clone(),
        publication_exists: publication.is_some(),
        publish_via_partition_root: publication.as_ref().map(|p| p.via_partition_root),
        publication_tables: publication
            .map(|p| p.tables.keys().map(|t| t.to_string()).collect())
            .unwrap_or_default(),
        failover: facts.slot_failover,
        synced: facts.slot_synced,
        synchronized_standby_slots: facts.synchronized_standby_slots,
        standbys,
        warnings,
        problem,
        replicas,
    })
}

/// Bytes for humans: `123 B`, `4.0 MiB`.
fn bytes(n: Option<i64>) -> String {
    match n {
        None => "unknown".into(),
        Some(n) if n.abs() < 1024 => format!("{n} B"),
        Some(n) => {
            let mut v = n as f64;
            let mut unit = "B";
            for u in ["KiB", "MiB", "GiB", "TiB"] {
                if v.abs() < 1024.0 {
                    break;
                }
                v /= 1024.0;
                unit = u;
            }
            format!("{v:.1} {unit} ({n} bytes)")
        }
    }
}

/// Who a walsender streams to, for people: application name, address and
/// host, connected since.
fn client_identity(c: Option<&StreamingClient>) -> String {
    let Some(c) = c else {
        return "client unknown (no pg_stat_replication row)".into();
    };
    let app = c.application_name.as_deref().unwrap_or("unknown");
    // client_port is -1 over a Unix socket, NULL when hidden from this role.
    let from = match (&c.client_addr, c.client_port) {
        (Some(addr), Some(port)) => format!("{addr}:{port}"),
        (Some(addr), None) => addr.clone(),
        (None, Some(_)) => "a local Unix socket".into(),
        (None, None) => "an address hidden from this role (grant it pg_read_all_stats, or run status as the worker's role)".into(),
    };
    let host = c
        .client_hostname
        .as_ref()
        .map(|h| format!(" ({h})"))
        .unwrap_or_default();
    let since = c
        .backend_start
        .as_ref()
        .map(|t| format!(", connected since {t}"))
        .unwrap_or_default();
    format!("application_name {app:?} from {from}{host}{since}")
}

/// The text form of `status`.
pub fn render(s: &Status) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    if s.slot_exists {
        out.push_str(&format!(
            "slot {:?}: plugin {}, {}\n",
            s.slot,
            opt(&s.plugin),
            match (s.active, s.active_pid, s.streaming) {
                (true, Some(pid), true) => format!(
                    "a worker streams it: {} (walsender PID {pid})",
                    client_identity(s.client.as_ref())
                ),
                (true, Some(pid), false) => format!(
                    "active, but not a cache-invalidator worker: {} (walsender PID {pid})",
                    client_identity(s.client.as_ref())
                ),
                _ => "inactive: no worker streams it".into(),
            }
        ));
        out.push_str(&format!(
            "  confirmed_flush_lsn {}  current {}  lag {}\n",
            opt(&s.confirmed_flush_lsn),
            opt(&s.current_lsn),
            bytes(s.lag_bytes)
        ));
        out.push_str(&format!(
            "  restart_lsn {}  WAL retained {}\n",
            opt(&s.restart_lsn),
            bytes(s.retained_wal_bytes)
        ));
        out.push_str(&format!(
            "  wal_status {}  safe_wal_size {}\n",
            opt(&s.wal_status),
            match s.safe_wal_size {
                None => "unlimited (max_slot_wal_keep_size = -1)".into(),
                v => bytes(v),
            }
        ));
        match s.failover {
            Some(true) => out.push_str(&format!(
                "  failover-enabled (synchronized to standbys with sync_replication_slots = on); synchronized_standby_slots = {:?}{}\n",
                s.synchronized_standby_slots.clone().unwrap_or_default(),
                if s.synced == Some(true) { "; synced: this copy came from a former primary" } else { "" }
            )),
            Some(false) => out.push_str("  not failover-enabled: a promoted standby will not have it\n"),
            None => out.push_str("  no failover slots before PostgreSQL 17: a failover recreates the slot with a full flush\n"),
        }
    } else {
        out.push_str(&format!("slot {:?}: missing\n", s.slot));
    }
    for st in &s.standbys {
        let what = match (st.reachable, st.slot_exists, st.synced) {
            (false, _, _) => format!("unreachable ({})", st.error.clone().unwrap_or_default()),
            (true, false, _) => {
                "standby without the slot: a promotion there means a full flush".into()
            }
            (true, true, true) => format!(
                "standby with a synchronized copy (confirmed_flush_lsn {})",
                opt(&st.confirmed_flush_lsn)
            ),
            (true, true, false) => {
                "standby with a slot of that name that is not synchronized".into()
            }
        };
        out.push_str(&format!("  {}: {what}\n", st.target));
    }
    if s.publication_exists {
        out.push_str(&format!(
            "publication {:?}: publish_via_partition_root {}, {} table(s): {}\n",
            s.publication,
            s.publish_via_partition_root.unwrap_or(false),
            s.publication_tables.len(),
            s.publication_tables.join(", ")
        ));
    } else {
        out.push_str(&format!("publication {:?}: missing\n", s.publication));
    }
    for r in &s.replicas {
        out.push_str(&r.render());
        out.push('\n');
    }
    for w in &s.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if let Some(p) = &s.problem {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}
