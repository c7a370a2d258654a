//! The start-up checks: one function, [`preflight`], that `run` calls before
//! it streams and `check` prints, so `check` exits non-zero exactly where
//! `run` would refuse or never get going (ARCHITECTURE.md, "check tells the
//! truth"; docs/operations.md, "Before the first start").
//!
//! What it checks, in order:
//! - PostgreSQL: the URL parses; the connection authenticates (a wrong
//!   password or a missing role is an error, an unreachable server is not:
//!   `run` retries it); the server is 14 or later; `wal_level = logical`; the
//!   role has `REPLICATION` (or is a superuser); the publication and the slot
//!   exist (unless `auto_setup` creates them) and the slot is a live
//!   `pgoutput` slot of this database; then the catalog checks of
//!   [`crate::map::catalog::check_catalog`]; each `[postgres] replicas`
//!   entry is a standby of this primary (a reachable server that is not is
//!   an error; an unreachable one a warning: `run` does not wait for it
//!   while it is down).
//! - Redis: the URL parses; the connection authenticates; the worker's
//!   commands are allowed by its ACL (probed with harmless ones on a key of
//!   its own); `maxmemory-policy` is not `allkeys-*`; `wait_replicas` does not
//!   exceed the connected replicas.
//!
//! Each problem is a [`Finding`]. [`Report::refusal`] says how `run` treats
//! them: errors refuse the start (exit 2, or exit 1 for a runtime problem such
//! as a wrong password), broken tables ([`Severity::Broken`]) start in
//! fallback for that table, warnings are logged.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::Config;
use crate::error::CliError;
use crate::map::catalog::{broken_tables, check_catalog, Finding, Severity};
use crate::map::{Mappings, TableName};
use crate::sink::mask_url;
use crate::source::{ConnectionSettings, RetryClass};

/// How long each server may take to answer the checks.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a server's checks ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Connected and checked.
    Checked,
    /// Not reachable now (a transient failure `run` retries): checks skipped.
    Unreachable(String),
    /// Not checked because of an error already reported as a finding.
    Failed,
}

/// What [`preflight`] found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every finding, errors first within each server.
    pub findings: Vec<Finding>,
    /// Findings that make `run` fail at run time (exit 1): authentication,
    /// a missing privilege, too few Redis replicas. A subset of the errors.
    pub runtime: Vec<String>,
    /// Whether the PostgreSQL checks ran.
    pub postgres: Reach,
    /// Whether the Redis checks ran.
    pub redis: Reach,
    /// Mapped tables DDL broke (dropped, a column gone), with why: `run`
    /// invalidates them by fallback.
    pub broken: BTreeMap<TableName, String>,
    /// One line per `[postgres] replicas` entry that is a reachable standby
    /// of the primary (its replay position and lag), for `check` to print.
    pub replicas: Vec<String>,
}

impl Report {
    /// Findings of one severity.
    pub fn of(&self, severity: Severity) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.severity == severity)
    }

    /// Whether `check` fails: any error or broken table.
    pub fn fails(&self) -> bool {
        self.findings.iter().any(|f| f.severity >= Severity::Broken)
    }

    /// How `run` refuses to start, if it does: exit 1 for runtime problems
    /// (authentication, privileges, replicas), exit 2 for every other error.
    /// Broken tables and warnings do not refuse.
    pub fn refusal(&self, config: &Config) -> Option<CliError> {
        let errors: Vec<String> = self.of(Severity::Error).map(|f| f.to_string()).collect();
        if errors.is_empty() {
            return None;
        }
        let text = format!(
            "refusing to run:\n{}\n(`cache-invalidator check --config {}` shows the same)",
            errors.join("\n"),
            config.path.display()
        );
        if !self.runtime.is_empty() {
            return Some(CliError::runtime(text));
        }
        Some(CliError::invalid(text))
    }
}

/// Runs every start-up check against the servers of `config`. Never fails:
/// what goes wrong is a finding, an unreachable server a [`Reach`].
pub async fn preflight(config: &Config, mappings: &Mappings) -> Report {
    let mut report = Report {
        findings: Vec::new(),
        runtime: Vec::new(),
        postgres: Reach::Failed,
        redis: Reach::Failed,
        broken: BTreeMap::new(),
        replicas: Vec::new(),
    };
    let (pg, redis) = tokio::join!(postgres(config, mappings), redis(config));
    report.postgres = pg.reach;
    report.redis = redis.reach;
    report.findings.extend(pg.findings);
    report.findings.extend(redis.findings);
    report.runtime.extend(pg.runtime);
    report.runtime.extend(redis.runtime);
    report.broken = pg.broken;
    report.replicas = pg.replicas;
    report
}

/// The result of one server's checks.
struct Part {
    reach: Reach,
    findings: Vec<Finding>,
    runtime: Vec<String>,
    broken: BTreeMap<TableName, String>,
    replicas: Vec<String>,
}

impl Part {
    fn new() -> Part {
        Part {
            reach: Reach::Checked,
            findings: Vec::new(),
            runtime: Vec::new(),
            broken: BTreeMap::new(),
            replicas: Vec::new(),
        }
    }
    fn error(&mut self, message: String) {
        self.findings.push(Finding::error(message));
    }
    fn runtime_error(&mut self, message: String) {
        self.runtime.push(message.clone());
        self.findings.push(Finding::error(message));
    }
}

/// The PostgreSQL half.
async fn postgres(config: &Config, mappings: &Mappings) -> Part {
    let mut part = Part::new();
    let pg = &config.postgres;
    let settings = match ConnectionSettings::parse(
        &pg.url,
        pg.password.as_ref().map(|s| s.expose().to_string()),
    ) {
        Ok(s) => s,
        Err(e) => {
            part.error(format!("[postgres] url: {e}"));
            part.reach = Reach::Failed;
            return part;
        }
    };
    let sql = match tokio::time::timeout(TIMEOUT, crate::pg::connect(&settings)).await {
        Err(_) => {
            part.reach = Reach::Unreachable(format!(
                "PostgreSQL at {} did not answer within {TIMEOUT:?}",
                settings.target()
            ));
            return part;
        }
        Ok(Err(e)) if e.retry_class() == RetryClass::Fatal => {
            part.runtime_error(e.to_string());
            part.reach = Reach::Failed;
            return part;
        }
        Ok(Err(e)) => {
            part.reach = Reach::Unreachable(e.to_string());
            return part;
        }
        Ok(Ok(sql)) => sql,
    };
    let client = sql.client();
    let url = sql.url().to_string();
    for (finding, runtime) in server_prerequisites(client, &url).await {
        if runtime {
            part.runtime.push(finding.message.clone());
        }
        part.findings.push(finding);
    }
    let setup_cmd = format!("cache-invalidator setup --config {}", config.path.display());
    match crate::pg::catalog::slot(client, &pg.slot).await {
        Err(e) => part.error(e.to_string()),
        Ok(None) if pg.auto_setup => part.findings.push(Finding::warning(format!(
            "replication slot {:?} does not exist yet: `run` creates it (auto_setup = true)",
            pg.slot
        ))),
        Ok(None) => part.error(format!(
            "replication slot {:?} does not exist in {url}: create it (and the publication) with `{setup_cmd}`",
            pg.slot
        )),
        Ok(Some(s)) => {
            let db = crate::pg::catalog::current_database(client)
                .await
                .unwrap_or_default();
            if s.slot_type != "logical" || s.plugin.as_deref() != Some("pgoutput") {
                part.error(format!(
                    "replication slot {:?} is a {} slot with plugin {:?}, not a logical pgoutput slot: choose another [postgres] slot name",
                    pg.slot,
                    s.slot_type,
                    s.plugin.unwrap_or_default()
                ));
            } else if s.database.as_deref() != Some(db.as_str()) {
                part.error(format!(
                    "replication slot {:?} belongs to database {:?}, not {db:?}: choose another [postgres] slot name",
                    pg.slot,
                    s.database.unwrap_or_default()
                ));
            } else if s.wal_status.as_deref() == Some("lost") && !pg.auto_setup {
                part.error(format!(
                    "replication slot {:?} lost WAL it needed (wal_status = 'lost'): invalidations in that gap are unknown; recreate it and flush with `{setup_cmd}`",
                    pg.slot
                ));
            }
        }
    }
    let tables: Vec<TableName> = mappings.tables().into_iter().cloned().collect();
    match crate::pg::catalog::snapshot(client, &tables, &pg.publication).await {
        Err(e) => part.error(e.to_string()),
        Ok(snap) => {
            if snap.publication.is_none() {
                if pg.auto_setup {
                    part.findings.push(Finding::warning(format!(
                        "publication {:?} does not exist yet: `run` creates it (auto_setup = true)",
                        pg.publication
                    )));
                } else {
                    part.error(format!(
                        "publication {:?} does not exist in {url}: create it (and the slot) with `{setup_cmd}`",
                        pg.publication
                    ));
                }
            }
            part.broken = broken_tables(mappings, &snap);
            part.findings.extend(
                check_catalog(mappings, &snap, &settings.application_name)
                    .into_iter()
                    // Said above, with what to run.
                    .filter(|f| !f.message.starts_with("the publication does not exist yet")),
            );
        }
    }
    let password = pg.password.as_ref().map(|p| p.expose());
    for r in crate::visibility::report::inspect_all(client, &pg.replicas, password).await {
        let line = format!("[postgres] replicas: {}", r.render());
        if r.is_wrong_server() {
            part.error(line);
        } else if !r.reachable {
            part.findings.push(Finding::warning(line));
        } else {
            part.replicas.push(r.render());
        }
    }
    part
}

/// What the server and the role must offer before anything else: PostgreSQL
/// 14 or later, `wal_level = logical`, the `REPLICATION` attribute (or
/// superuser). Each finding with whether it is a runtime problem (exit 1 in
/// `run`). `setup` refuses on these before it changes anything.
pub async fn server_prerequisites(
    client: &tokio_postgres::Client,
    url: &str,
) -> Vec<(Finding, bool)> {
    let mut out = Vec::new();
    let row = match client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('wal_level'), \
                    current_user::text, \
                    coalesce((SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), false)",
            &[],
        )
        .await
    {
        Ok(row) => row,
        Err(e) => {
            out.push((
                Finding::error(
                    crate::pg::PgError::query("reading the server settings", e)
                        .at(url)
                        .to_string(),
                ),
                true,
            ));
            return out;
        }
    };
    let version: i32 = row.get(0);
    let wal_level: String = row.get(1);
    let user: String = row.get(2);
    let may_replicate: bool = row.get(3);
    if version < 140000 {
        out.push((
            Finding::error(format!(
                "PostgreSQL ({url}) is version {version}: cache-invalidator needs PostgreSQL 14 or later"
            )),
            false,
        ));
    }
    if wal_level != "logical" {
        out.push((
            Finding::error(format!(
                "wal_level is {wal_level:?} on {url}, logical decoding needs wal_level = logical: `ALTER SYSTEM SET wal_level = logical`, then restart PostgreSQL"
            )),
            false,
        ));
    }
    if !may_replicate {
        out.push((
            Finding::error(format!(
                "role {user:?} may not start replication ({url}): run `ALTER ROLE {} REPLICATION;` as a superuser",
                crate::quote::quote_ident(&user)
            )),
            true,
        ));
    }
    out
}

/// The Redis half (the first seed of a cluster).
async fn redis(config: &Config) -> Part {
    let mut part = Part::new();
    let options = config.sink_options();
    let target = mask_url(&options.url);
    let client = match crate::sink::client(&options) {
        Ok(c) => c,
        Err(e) => {
            part.error(format!("[redis]: {e}"));
            part.reach = Reach::Failed;
            return part;
        }
    };
    let connect = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    let mut conn = match tokio::time::timeout(TIMEOUT, connect).await {
        Err(_) => {
            part.reach = Reach::Unreachable(format!("{target}: no answer within {TIMEOUT:?}"));
            return part;
        }
        Ok(Err(e)) if is_auth_error(&e) => {
            part.runtime_error(format!(
                "Redis at {target} refused authentication ({e}): check the password (URL or [redis] password_file) and the ACL user"
            ));
            part.reach = Reach::Failed;
            return part;
        }
        Ok(Err(e)) => {
            part.reach = Reach::Unreachable(format!("cannot reach Redis at {target}: {e}"));
            return part;
        }
        Ok(Ok(conn)) => conn,
    };

    // The worker's ACL: harmless commands on a key of its own.
    let probe_key = format!("cache-invalidator:{}:preflight", config.postgres.slot);
    let mut denied = Vec::new();
    for (name, cmd) in acl_probes(&probe_key) {
        match tokio::time::timeout(TIMEOUT, cmd.query_async::<redis::Value>(&mut conn)).await {
            Ok(Err(e)) if e.code() == Some("NOPERM") || is_auth_error(&e) => denied.push(name),
            _ => {}
        }
    }
    if !denied.is_empty() {
        part.runtime_error(format!(
            "Redis at {target} does not allow {} for this user: the worker would block on its first batch; grant the rule `check` prints below (docs/security.md)",
            denied.join(", ")
        ));
    }

    let info = async {
        redis::cmd("INFO")
            .arg("memory")
            .arg("replication")
            .query_async::<String>(&mut conn)
            .await
    };
    match tokio::time::timeout(TIMEOUT, info).await {
        Ok(Ok(info)) => {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            };
            if let Some(policy) = field("maxmemory_policy") {
                if policy.starts_with("allkeys-") {
                    part.error(format!(
                        "Redis maxmemory-policy is {policy} ({target}): it evicts tag sets and version keys, which silently loses invalidations; use noeviction or a volatile-* policy"
                    ));
                }
            }
            let wanted = config.redis.wait_replicas;
            if wanted > 0 {
                let connected: u32 = field("connected_slaves")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if connected < wanted {
                    part.runtime_error(format!(
                        "[redis] wait_replicas = {wanted} but {target} has {connected} connected replica(s): every acknowledgement would wait for replicas that are not there; attach replicas or lower wait_replicas"
                    ));
                }
            }
        }
        Ok(Err(e)) if e.code() == Some("NOPERM") => part.findings.push(Finding::warning(format!(
            "{target} does not allow INFO ({e}); check by hand that maxmemory-policy is not allkeys-* and that wait_replicas replicas are connected"
        ))),
        Ok(Err(e)) => part.findings.push(Finding::warning(format!(
            "INFO failed on {target}: {e}; maxmemory-policy and replicas not checked"
        ))),
        Err(_) => part.findings.push(Finding::warning(format!(
            "INFO did not answer within {TIMEOUT:?} on {target}; maxmemory-policy and replicas not checked"
        ))),
    }
    part
}

/// Whether a Redis error means the credentials were refused (`WRONGPASS`,
/// `NOAUTH`, or the client's authentication failure).
pub fn is_auth_error(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS") | Some("NOAUTH"))
}

/// Commands the worker sends, each in a form that changes nothing but the
/// probe key (which it leaves absent).
fn acl_probes(key: &str) -> Vec<(&'static str, redis::Cmd)> {
    let mut out = Vec::new();
    let mut c = redis::cmd("EXISTS");
    c.arg(key);
    out.push(("EXISTS", c));
    let mut c = redis::cmd("GET");
    c.arg(key);
    out.push(("GET", c));
    let mut c = redis::cmd("SET");
    c.arg(key).arg("1").arg("PX").arg(1000);
    out.push(("SET", c));
    let mut c = redis::cmd("INCR");
    c.arg(key);
    out.push(("INCR", c));
    let mut c = redis::cmd("SPOP");
    c.arg(format!("{key}:set"));
    out.push(("SPOP", c));
    let mut c = redis::cmd("UNLINK");
    c.arg(key);
    out.push(("UNLINK", c));
    let mut c = redis::cmd("SCAN");
    c.arg(0).arg("MATCH").arg(key).arg("COUNT").arg(1);
    out.push(("SCAN", c));
    let mut c = redis::cmd("SCRIPT");
    c.arg("LOAD").arg("return 1");
    out.push(("SCRIPT LOAD", c));
    let mut c = redis::cmd("EVALSHA");
    // sha1("return 1"), loaded just above.
    c.arg("e0e1f9fabfc9d4800c877a703b823ac0578ff8db").arg(0);
    out.push(("EVALSHA", c));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_evalsha_probe_is_the_sha_of_its_script() {
        let script = redis::Script::new("return 1");
        assert_eq!(
            script.get_hash(),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
        let probes = acl_probes("k");
        assert!(probes.iter().any(|(n, _)| *n == "EVALSHA"));
    }

    #[test]
    fn auth_errors_are_recognized() {
        let e = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(is_auth_error(&e));
        let e =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_auth_error(&e));
    }
}
