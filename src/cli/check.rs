//! `cache-invalidator check`: validates the config and the mappings.
//!
//! First offline: config, mappings (templates, truncates, fields), and
//! warnings about row-level patterns. Then, when PostgreSQL is reachable,
//! [`crate::map::catalog::check_catalog`] over a snapshot read by
//! [`crate::pg::catalog::snapshot`]; when Redis is reachable,
//! [`crate::map::catalog::check_maxmemory_policy`]. An unreachable server
//! skips its checks with a warning.

use std::path::Path;
use std::time::Duration;

use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::map::catalog::{check_catalog, check_maxmemory_policy, Finding, Severity};
use crate::map::{Mappings, TableName, TruncateSource};
use crate::sink::mask_url;

/// The result of the offline checks: the loaded config and mappings, and warnings.
pub struct Checked {
    /// The validated config.
    pub config: Config,
    /// The validated mappings.
    pub mappings: Mappings,
    /// Findings that do not fail `check`.
    pub warnings: Vec<Finding>,
}

/// Loads and validates the config and its mappings (no network).
pub fn check_offline(config_path: &Path, env: &EnvOverrides) -> Result<Checked, CliError> {
    let config = Config::load(config_path, env).map_err(|e| CliError::Invalid(e.to_string()))?;
    let mappings = config
        .mappings
        .load()
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    let warnings = offline_warnings(&mappings);
    Ok(Checked {
        config,
        mappings,
        warnings,
    })
}

/// Warnings that need no database: row-level patterns cost a SCAN pass per
/// batch; `truncate = "none"` disables the fallback.
pub fn offline_warnings(mappings: &Mappings) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in mappings.rules() {
        if r.patterns.iter().any(|p| p.has_placeholders()) {
            out.push(Finding {
                severity: Severity::Warning,
                message: format!(
                    "{}: {} has row-level patterns: every batch touching it runs a SCAN of the whole keyspace; prefer keys or tags on busy tables",
                    r.location, r.table
                ),
            });
        }
        if r.truncate_source == TruncateSource::None {
            out.push(Finding {
                severity: Severity::Warning,
                message: format!(
                    "{}: {} has truncate = \"none\": a TRUNCATE, a flush or a fallback (unknown value) of this table invalidates nothing for this rule",
                    r.location, r.table
                ),
            });
        }
    }
    out
}

/// Runs `check`: the offline part, then the catalog and publication checks
/// when PostgreSQL is reachable and the `maxmemory-policy` check when Redis
/// is. An unreachable server is a warning ("... checks skipped"), not a
/// failure. Exit 2 when any error finding remains.
pub async fn run(config_path: &Path) -> Result<(), CliError> {
    let checked = check_offline(config_path, &EnvOverrides::from_env())?;
    let mut findings = checked.warnings.clone();
    let mut catalog_done = false;
    let mut redis_done = false;

    let pg = &checked.config.postgres;
    match crate::pg::connect_sql(&pg.url, pg.password.as_ref().map(|p| p.expose())).await {
        Err(e) => findings.push(warning(format!(
            "catalog checks skipped: {e} (run `check` where the database is reachable)"
        ))),
        Ok(client) => {
            let tables: Vec<TableName> = checked.mappings.tables().into_iter().cloned().collect();
            match crate::pg::catalog::snapshot(&client, &tables, &pg.publication).await {
                Ok(snap) => {
                    findings.extend(check_catalog(
                        &checked.mappings,
                        &snap,
                        crate::pg::APPLICATION_NAME,
                    ));
                    catalog_done = true;
                }
                Err(e) => findings.push(warning(format!("catalog checks skipped: {e}"))),
            }
        }
    }

    let mut replica_lines = Vec::new();
    if !pg.replicas.is_empty() {
        match crate::pg::connect_sql(&pg.url, pg.password.as_ref().map(|p| p.expose())).await {
            Err(e) => findings.push(warning(format!(
                "replica checks skipped: the primary is unreachable: {e}"
            ))),
            Ok(primary) => {
                let reports = crate::visibility::report::inspect_all(
                    &primary,
                    &pg.replicas,
                    pg.password.as_ref().map(|p| p.expose()),
                )
                .await;
                for r in reports {
                    if r.is_wrong_server() {
                        findings.push(Finding {
                            severity: Severity::Error,
                            message: format!("[postgres] replicas: {}", r.render()),
                        });
                    } else if !r.reachable {
                        findings.push(warning(format!("[postgres] replicas: {}", r.render())));
                    } else {
                        replica_lines.push(r.render());
                    }
                }
            }
        }
    }

    match redis_maxmemory_policy(&checked.config).await {
        Ok(policy) => {
            findings.extend(check_maxmemory_policy(&policy));
            redis_done = true;
        }
        Err(why) => findings.push(warning(format!("Redis checks skipped: {why}"))),
    }

    for f in &findings {
        eprintln!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let rules = checked.mappings.rules().len();
    let tables = checked.mappings.tables().len();
    let files = checked.mappings.files().len();
    let acl = format!(
        "Redis ACL for the worker: {}",
        crate::security::redis_acl_rule(&crate::security::mapped_channels(&checked.mappings))
    );
    if errors > 0 {
        println!("{acl}");
        return Err(CliError::Invalid(format!(
            "{errors} error(s) in {rules} rule(s) on {tables} table(s) from {files} file(s): see above"
        )));
    }
    let scope = match (catalog_done, redis_done) {
        (true, true) => "checked against the catalog, the publication and Redis",
        (true, false) => "checked against the catalog and the publication; Redis not checked",
        (false, true) => "checked against Redis; catalog checks skipped",
        (false, false) => "offline checks only: PostgreSQL and Redis unreachable",
    };
    println!("ok: {rules} rule(s) on {tables} table(s) from {files} file(s); {scope}");
    for line in &replica_lines {
        println!("{line}");
    }
    println!("{acl}");
    Ok(())
}

fn warning(message: String) -> Finding {
    Finding {
        severity: Severity::Warning,
        message,
    }
}

/// How long `check` waits for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// `CONFIG GET maxmemory-policy`, or why it could not be read.
pub(crate) async fn redis_maxmemory_policy(config: &Config) -> Result<String, String> {
    let url = match (&config.redis.url, config.redis.cluster.first()) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u.clone(),
        (None, None) => return Err("no Redis URL configured".into()),
    };
    let target = mask_url(&url);
    let mut options = super::flush::sink_options(config).map_err(|e| e.to_string())?;
    options.url = url;
    let client = crate::sink::client(&options).map_err(|e| format!("{target}: {e}"))?;
    // INFO memory (allowed by the worker's ACL) rather than CONFIG GET.
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(&mut conn)
            .await
    };
    match tokio::time::timeout(REDIS_TIMEOUT, query).await {
        Err(_) => Err(format!("{target}: no answer within {REDIS_TIMEOUT:?}")),
        Ok(Err(e)) if e.code() == Some("NOPERM") => Err(format!(
            "{target} does not allow INFO ({e}); check maxmemory-policy by hand: it must not be allkeys-*"
        )),
        Ok(Err(e)) => Err(format!("cannot query {target}: {e}")),
        Ok(Ok(info)) => info
            .lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(|p| p.trim().to_string())
            .ok_or_else(|| format!("{target}: INFO memory has no maxmemory_policy")),
    }
}
