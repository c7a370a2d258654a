//! `cache-invalidator check`: validates the config and the mappings.
//!
//! Offline part here: config, mappings (templates, truncates, fields), and
//! warnings about row-level patterns. The catalog part plugs in through
//! [`crate::map::catalog::check_catalog`] over a snapshot the caller fills
//! from PostgreSQL (and [`crate::map::catalog::check_maxmemory_policy`] for Redis).

use std::path::Path;

use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::map::catalog::{Finding, Severity};
use crate::map::{Mappings, TruncateSource};

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

/// Runs `check` (offline part) and prints the result.
pub fn run(config_path: &Path) -> Result<(), CliError> {
    let checked = check_offline(config_path, &EnvOverrides::from_env())?;
    for w in &checked.warnings {
        eprintln!("{w}");
    }
    let tables = checked.mappings.tables().len();
    println!(
        "ok: {} rule(s) on {} table(s) from {} file(s); catalog checks need a reachable PostgreSQL (not run)",
        checked.mappings.rules().len(),
        tables,
        checked.mappings.files().len()
    );
    println!(
        "Redis ACL for the worker: {}",
        crate::security::redis_acl_rule(&crate::security::mapped_channels(&checked.mappings))
    );
    Ok(())
}
