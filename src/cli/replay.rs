//! `cache-invalidator replay FILE`: runs the mappings over a recorded file
//! offline and prints one JSON plan per transaction.
//!
//! A malformed line stops replay before anything is planned or applied (exit
//! 2, naming the line) unless `--skip-bad-lines`. `--apply` executes each
//! transaction's plan against the config's Redis, in order, with the worker's sink.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, EnvOverrides};
use crate::error::{Because, CliError};
use crate::replay::{parse_file, Replayer, TxnPlan};

/// The epoch carried by default messages during replay.
pub const REPLAY_EPOCH: &str = "replay";

/// Runs `replay`; with `apply`, each transaction's plan is executed against
/// Redis in order (and printed as without it).
pub async fn run(
    config_path: &Path,
    file: &Path,
    apply: bool,
    skip_bad_lines: bool,
) -> Result<(), CliError> {
    let config = Config::load(config_path, &EnvOverrides::from_env()).map_err(CliError::invalid)?;
    let mappings = config.mappings.load().map_err(CliError::invalid)?;
    let text = std::fs::read_to_string(file).map_err(|e| {
        CliError::invalid(Because::new(format!("cannot read {}", file.display()), e))
    })?;
    let (txns, bad) = parse_file(&text, skip_bad_lines).map_err(|b| {
        CliError::invalid(format!(
            "{}:{b}; nothing was replayed (use --skip-bad-lines to skip it)",
            file.display()
        ))
    })?;
    for b in &bad {
        tracing::warn!(file = %file.display(), line = b.line, error = %b.message, "skipped a malformed line");
    }
    let mut sink = if apply {
        let options = config.sink_options();
        let mut sink = super::flush::connect_sink(&options, config.redis.target.seeds()).await?;
        sink.tune(&config.sink_tuning());
        Some(sink)
    } else {
        None
    };
    let mut replayer = Replayer::new(Arc::new(mappings), config.planner_context(REPLAY_EPOCH));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for t in &txns {
        let raw = replayer.transaction(t);
        if let Some(sink) = sink.as_mut() {
            let stats = super::flush::apply_with_retry(sink, &raw).await?;
            tracing::info!(xid = t.xid, lsn = %t.lsn, keys = stats.keys, tags = stats.tags, versions = stats.versions, published = stats.published, "applied");
        }
        let plan = TxnPlan::from_plan(t.xid, t.lsn, raw);
        for f in replayer.planner().take_fallbacks() {
            if f.reason.is_refresh() {
                tracing::warn!(table = %f.table, reason = f.reason.as_str(), column = f.column.as_deref().unwrap_or(""), count = f.count, xid = t.xid, "refreshed value unknown or too large: unlinked its key instead");
            } else {
                tracing::warn!(table = %f.table, reason = f.reason.as_str(), column = f.column.as_deref().unwrap_or(""), count = f.count, xid = t.xid, "value unknown: fired the table's truncate invalidations");
            }
        }
        for m in replayer.planner().take_malformed() {
            tracing::warn!(error = %m.error, xid = t.xid, lsn = %t.lsn, "a cache-invalidator message could not be understood: flushed every mapped table");
        }
        let line = serde_json::to_string(&plan).map_err(CliError::runtime)?;
        writeln!(out, "{line}").map_err(CliError::runtime)?;
    }
    Ok(())
}
