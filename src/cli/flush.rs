//! `cache-invalidator flush [--table T]`: fires the `truncate` invalidations
//! of every mapped table (or one) against Redis, for changes the WAL cannot
//! show (DDL rewrites, DROP/DETACH PARTITION, restores). Needs no PostgreSQL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::map::TableName;
use crate::plan::{Plan, Planner};
use crate::retry::Backoff;
use crate::sink::{ApplySink, ApplyStats, RetryClass, Sink, SinkError, SinkOptions};

/// Attempts to apply a plan on a transient error.
const ATTEMPTS: u32 = 4;
/// Attempts to connect (each one already retries inside the connection manager).
const CONNECT_ATTEMPTS: u32 = 2;

/// Connects to Redis (the cluster of `cluster` when it lists seed URLs),
/// retrying transient failures with a short backoff.
pub async fn connect_sink(options: &SinkOptions, cluster: &[String]) -> Result<Sink, CliError> {
    retry_transient(CONNECT_ATTEMPTS, "cannot reach Redis", async || {
        Sink::connect(options, cluster).await
    })
    .await
}

/// Applies one plan, retrying it whole on transient errors (it is idempotent).
pub async fn apply_with_retry(sink: &mut Sink, plan: &Plan) -> Result<ApplyStats, CliError> {
    retry_transient(ATTEMPTS, "applying the plan failed", async || {
        sink.apply(plan).await
    })
    .await
}

/// Runs `op` up to `attempts` times while it fails with
/// [`RetryClass::BackOff`], waiting [`flush_backoff`]'s delays between
/// attempts; `failed` says what went wrong in the warning of each retry.
async fn retry_transient<T>(
    attempts: u32,
    failed: &str,
    mut op: impl AsyncFnMut() -> Result<T, SinkError>,
) -> Result<T, CliError> {
    let mut attempt = 1;
    let mut backoff = flush_backoff();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retry_class() == RetryClass::BackOff && attempt < attempts => {
                tracing::warn!(error = %e, attempt, "{failed}; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                attempt += 1;
            }
            Err(e) => return Err(CliError::runtime(e)),
        }
    }
}

/// `flush`'s retries: 0.5 s doubling up to 8 s, like the worker's but longer
/// (a one-shot command that should not give up on a failover).
fn flush_backoff() -> Backoff {
    Backoff::between(Duration::from_millis(500), Duration::from_secs(8))
}

/// Runs `flush`.
pub async fn run(config_path: &Path, table: Option<&str>) -> Result<(), CliError> {
    let config = Config::load(config_path, &EnvOverrides::from_env()).map_err(CliError::invalid)?;
    let mappings = config.mappings.load().map_err(CliError::invalid)?;
    let mapped: Vec<String> = mappings.tables().iter().map(|t| t.to_string()).collect();
    let mut planner = Planner::new(Arc::new(mappings), config.planner_context("flush"));
    let scope = match table {
        None => {
            planner.flush_all();
            format!("all {} mapped table(s)", mapped.len())
        }
        Some(t) => {
            let name = TableName::parse(t).map_err(CliError::invalid)?;
            if !planner.flush_table(&name) {
                return Err(CliError::invalid(format!(
                    "table {name} is not mapped; mapped tables: {}",
                    mapped.join(", ")
                )));
            }
            name.to_string()
        }
    };
    let plan = planner.take();
    let options = config.sink_options();
    let mut sink = connect_sink(&options, config.redis.target.seeds()).await?;
    let stats = apply_with_retry(&mut sink, &plan).await?;
    println!(
        "flushed {scope} on {}: {} pattern(s), {} tag pattern(s), {} version pattern(s), {} exact key(s) -> {} key(s) unlinked, {} tag set(s) emptied ({} member(s)), {} version(s) bumped, {} message(s) published",
        sink.target(),
        plan.patterns.len(),
        plan.tag_patterns.len(),
        plan.version_patterns.len(),
        plan.keys.len(),
        stats.keys,
        stats.tags,
        stats.tag_members,
        stats.versions,
        stats.published,
    );
    Ok(())
}
