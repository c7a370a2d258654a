//! `cache-invalidator check`: validates the config and the mappings.
//!
//! First offline: config, mappings (templates, truncates, fields), and
//! warnings about row-level patterns. Then the start-up checks `run` does,
//! [`crate::preflight::preflight`] (the same function): URLs, authentication,
//! privileges, `wal_level`, the slot and the publication, the catalog, the
//! Redis ACL, `maxmemory-policy` and `wait_replicas`. An unreachable server
//! skips its checks with a warning.

use std::path::Path;

use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::map::catalog::{Finding, Severity};
use crate::map::TableName;
use crate::map::{Mappings, TruncateSource};
use crate::preflight::Reach;

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
    let config = Config::load(config_path, env).map_err(CliError::invalid)?;
    let mappings = config.mappings.load().map_err(CliError::invalid)?;
    let mut warnings = offline_warnings(&mappings);
    warnings.extend(prefix_warnings(
        &mappings,
        &config.redis.tag_prefix,
        &config.redis.version_prefix,
    ));
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

/// Warnings about templates that are probably mistakes: a tag or version
/// template that already starts with its prefix (`tags = ["tag:user:{id}"]`
/// invalidates the set `tag:tag:user:<id>`), and a pattern that matches every
/// key (`patterns = ["*"]` deletes the whole database on each change).
pub fn prefix_warnings(
    mappings: &Mappings,
    tag_prefix: &str,
    version_prefix: &str,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in mappings.rules() {
        for (templates, prefix, what) in [
            (&r.tags, tag_prefix, "tag"),
            (&r.versions, version_prefix, "version"),
        ] {
            for t in templates {
                if !prefix.is_empty() && t.source().starts_with(prefix) && t.source() != prefix {
                    out.push(Finding::warning(format!(
                        "{}: {} {what} template {:?} already starts with the {what} prefix {prefix:?}: the worker invalidates {prefix}{}; write it without the prefix",
                        r.location,
                        r.table,
                        t.source(),
                        t.source()
                    )));
                }
            }
        }
        // The default truncate derives from the row patterns: once each.
        let patterns: std::collections::BTreeSet<&str> = r
            .patterns
            .iter()
            .map(|p| p.source())
            .chain(r.truncate.patterns.iter().map(String::as_str))
            .collect();
        for p in patterns {
            if !p.is_empty() && p.chars().all(|c| c == '*') {
                out.push(Finding::warning(format!(
                    "{}: {} has the pattern {p:?}: it matches every key of the database, so each invalidation deletes the whole cache; narrow it (e.g. \"user:*\")",
                    r.location, r.table
                )));
            }
        }
    }
    out
}

/// Runs `check`: the offline part, then [`crate::preflight::preflight`], the
/// same checks `run` does before it streams. An unreachable server is a
/// warning ("... checks skipped"), not a failure (`run` retries it). Exit 2
/// when any error or broken table remains: wherever `run` would refuse, or
/// start without invalidating everything precisely.
pub async fn run(config_path: &Path) -> Result<(), CliError> {
    let checked = check_offline(config_path, &EnvOverrides::from_env())?;
    let mut findings = checked.warnings.clone();
    let report = crate::preflight::preflight(&checked.config, &checked.mappings).await;
    findings.extend(report.findings.iter().cloned());
    if matches!(report.redis, Reach::Checked)
        && checked.mappings.rules().iter().any(has_row_patterns)
    {
        match redis_dbsize(&checked.config).await {
            Ok(keys) => findings.extend(pattern_cost_warning(&checked.mappings, keys)),
            Err(why) => findings.push(warning(format!("pattern cost not estimated: {why}"))),
        }
    }
    if let Reach::Unreachable(why) = &report.postgres {
        findings.push(warning(format!(
            "catalog checks skipped: {why} (run `check` where the database is reachable)"
        )));
    }

    let pg = &checked.config.postgres;
    if !pg.replicas.is_empty() && !matches!(report.postgres, Reach::Checked) {
        findings.push(warning(
            "replica checks skipped: the primary was not checked".to_string(),
        ));
    }
    if !matches!(report.postgres, Reach::Unreachable(_)) {
        // One SQL connection for the checks beyond the start-up checks'.
        match crate::pg::connect_url(&pg.url, pg.password.as_ref().map(|p| p.expose())).await {
            Ok(sql) => {
                // Failover slots (17+): warnings only, `run` does not need them.
                match crate::pg::failover::read(sql.client(), &pg.slot).await {
                    Ok(facts) => findings.extend(crate::pg::failover::findings(
                        &facts,
                        &pg.slot,
                        pg.failover_slot,
                    )),
                    Err(e) => findings.push(warning(format!("failover checks skipped: {e}"))),
                }
                let tables: Vec<TableName> =
                    checked.mappings.tables().into_iter().cloned().collect();
                findings.extend(ddl_tracking(sql.client(), &tables).await);
            }
            Err(e) => findings.push(warning(format!(
                "failover and DDL tracking checks skipped: {e}"
            ))),
        }
    }

    if let Reach::Unreachable(why) = &report.redis {
        findings.push(warning(format!("Redis checks skipped: {why}")));
    }
    // Errors first: they are what to fix.
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    for f in &findings {
        eprintln!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity >= Severity::Broken)
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
        return Err(CliError::invalid(format!(
            "{errors} error(s) in {rules} rule(s) on {tables} table(s) from {files} file(s): see above"
        )));
    }
    let scope = match (&report.postgres, &report.redis) {
        (Reach::Checked, Reach::Checked) => {
            "checked against the catalog, the publication, the slot and Redis"
        }
        (Reach::Checked, _) => {
            "checked against the catalog, the publication and the slot; Redis not checked"
        }
        (_, Reach::Checked) => "checked against Redis; catalog checks skipped",
        _ => "offline checks only: PostgreSQL and Redis unreachable",
    };
    println!("ok: {rules} rule(s) on {tables} table(s) from {files} file(s); {scope}");
    for line in &report.replicas {
        println!("{line}");
    }
    println!("{acl}");
    Ok(())
}

/// Warnings about DDL tracking: without the event triggers of `setup
/// --ddl-trigger`, DDL that changes what readers see without row events is
/// not tracked; with them, `mapped_tables` must name the mapped tables.
async fn ddl_tracking(client: &tokio_postgres::Client, tables: &[TableName]) -> Vec<Finding> {
    use super::sql_api as api;
    let installed = match client.query_one(api::TRIGGERS_INSTALLED_SQL, &[]).await {
        Ok(row) => row.get::<_, bool>(0),
        Err(e) => {
            return vec![warning(format!(
                "DDL tracking not checked: {}",
                crate::pg::describe(&e)
            ))]
        }
    };
    if !installed {
        return vec![warning(
            "DDL is not tracked: the event triggers of `cache-invalidator setup --ddl-trigger` are not installed, so a rewrite (ALTER COLUMN ... TYPE), a partition DROP/DETACH/ATTACH, a DROP of a mapped table or a REFRESH of a mapped materialized view leaves stale entries until `cache-invalidator flush --table T`"
                .into(),
        )];
    }
    match client.query_one(api::CAN_READ_MAPPED_SQL, &[]).await {
        Ok(row) if row.get::<_, bool>(0) => {}
        // The worker's role may not read the API's schema: nothing to compare.
        _ => return Vec::new(),
    }
    let names: Vec<String> = match client.query(api::MAPPED_TABLES_SQL, &[]).await {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            return vec![warning(format!(
                "DDL tracking not checked: {}",
                crate::pg::describe(&e)
            ))]
        }
    };
    let missing: Vec<String> = tables
        .iter()
        .map(|t| t.to_string())
        .filter(|t| !names.contains(t))
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    vec![warning(format!(
        "DDL of {} is not tracked: cache_invalidator.mapped_tables does not name it; rerun `cache-invalidator setup`",
        missing.join(", ")
    ))]
}

/// A keyspace at least this large makes `check` warn about row-level patterns.
pub const LARGE_KEYSPACE: u64 = 1_000_000;

/// Keys a pattern pass visits per second, for `check`'s estimate: a bare
/// `SCAN ... MATCH` pass over 1,000,000 keys took 0.75 s on the idle 2-core
/// reference machine (issue 17's measurement; docs/operations.md).
pub const SCAN_KEYS_PER_SECOND: f64 = 1_300_000.0;

fn has_row_patterns(rule: &crate::map::Rule) -> bool {
    rule.patterns.iter().any(|p| p.has_placeholders())
}

/// The warning for rules with row-level patterns when Redis holds `keys`
/// keys (at least [`LARGE_KEYSPACE`]): each batch touching them runs a pass
/// over every key; the estimate, and tags as the cheaper alternative.
pub fn pattern_cost_warning(mappings: &Mappings, keys: u64) -> Option<Finding> {
    if keys < LARGE_KEYSPACE {
        return None;
    }
    let rules: Vec<String> = mappings
        .rules()
        .iter()
        .filter(|r| has_row_patterns(r))
        .map(|r| format!("{} ({})", r.table, r.location))
        .collect();
    if rules.is_empty() {
        return None;
    }
    let seconds = keys as f64 / SCAN_KEYS_PER_SECOND;
    Some(warning(format!(
        "Redis holds {keys} keys and {} have row-level patterns: every pattern pass scans the whole keyspace, about {seconds:.1} s per pass (estimated at {:.1} million keys/s; passes run in their own lane and coalesce, but a transaction with a pattern is acknowledged only after its pass). On hot paths prefer tags: a tag costs O(its members), a pattern O(keyspace) (docs/operations.md, \"Patterns and what they cost\")",
        rules.join(", "),
        SCAN_KEYS_PER_SECOND / 1e6
    )))
}

/// `DBSIZE` of the configured Redis (on a cluster, of the first seed node).
async fn redis_dbsize(config: &Config) -> Result<u64, String> {
    let options = config.sink_options();
    let target = crate::sink::mask_url(&options.url);
    let client = crate::sink::client(&options).map_err(|e| format!("{target}: {e}"))?;
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("DBSIZE").query_async::<u64>(&mut conn).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), query).await {
        Err(_) => Err(format!("{target}: no answer within 5 s")),
        Ok(Err(e)) => Err(format!("cannot query DBSIZE on {target}: {e}")),
        Ok(Ok(n)) => Ok(n),
    }
}

fn warning(message: String) -> Finding {
    Finding::warning(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixed_tag_and_a_match_everything_pattern_are_warned() {
        let m = Mappings::parse(
            "m.toml",
            "[[table]]\nname = \"users\"\ntags = [\"tag:user:{id}\", \"user:{id}\"]\nversions = [\"version:u:{id}\"]\npatterns = [\"*\"]\n",
        )
        .unwrap();
        let w = prefix_warnings(&m, "tag:", "version:");
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].message
                .contains("\"tag:user:{id}\" already starts with the tag prefix"),
            "{w:?}"
        );
        assert!(
            w[1].message
                .contains("\"version:u:{id}\" already starts with the version prefix"),
            "{w:?}"
        );
        assert!(w[2].message.contains("matches every key"), "{w:?}");
        assert!(w.iter().all(|f| f.severity == Severity::Warning));
    }

    #[test]
    fn large_keyspaces_warn_about_row_level_patterns_only() {
        let with = Mappings::parse(
            "m.toml",
            "[[table]]\nname = \"posts\"\nkeys = [\"post:{id}\"]\npatterns = [\"post:{id}:comments:*\"]\n",
        )
        .unwrap();
        let without = Mappings::parse(
            "m.toml",
            "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n",
        )
        .unwrap();
        assert!(pattern_cost_warning(&with, LARGE_KEYSPACE - 1).is_none());
        assert!(pattern_cost_warning(&without, 50_000_000).is_none());
        let w = pattern_cost_warning(&with, 13_000_000).unwrap();
        assert_eq!(w.severity, Severity::Warning);
        assert!(w.message.contains("13000000 keys"), "{}", w.message);
        assert!(w.message.contains("about 10.0 s per pass"), "{}", w.message);
        assert!(w.message.contains("public.posts"), "{}", w.message);
        assert!(w.message.contains("prefer tags"), "{}", w.message);
    }
}
