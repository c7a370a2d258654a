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
use crate::sink::{ApplySink, ApplyStats, RetryClass, Sink, SinkOptions};

/// Attempts to apply a plan on a transient error.
const ATTEMPTS: u32 = 4;
/// Attempts to connect (each one already retries inside the connection manager).
const CONNECT_ATTEMPTS: u32 = 2;

/// The sink options of the config's `[redis]` section (the CLI runs without
/// the worker's delayed second pass). With `[redis] cluster`, `url` is empty
/// and the seed URLs go to [`connect_sink`].
pub fn sink_options(config: &Config) -> Result<SinkOptions, CliError> {
    let cluster_url = (!config.redis.cluster.is_empty()).then(String::new);
    let url = config.redis.url.clone().or(cluster_url).ok_or_else(|| {
        CliError::Invalid(format!(
            "{}: [redis] has neither url nor cluster (set [redis] url, [redis] cluster or CACHE_INVALIDATOR_REDIS_URL)",
            config.path.display()
        ))
    })?;
    Ok(SinkOptions {
        url,
        password: config
            .redis
            .password
            .as_ref()
            .map(|p| p.expose().to_owned()),
        wait_replicas: config.redis.wait_replicas,
        redelete_after: None,
        tls: config.redis.tls.clone(),
    })
}

/// Connects to Redis (the cluster of `cluster` when it lists seed URLs),
/// retrying transient failures with a short backoff.
pub async fn connect_sink(options: &SinkOptions, cluster: &[String]) -> Result<Sink, CliError> {
    let mut attempt = 1;
    loop {
        match Sink::connect(options, cluster).await {
            Ok(s) => return Ok(s),
            Err(e) if e.retry_class() == RetryClass::BackOff && attempt < CONNECT_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "cannot reach Redis; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(CliError::runtime(e)),
        }
    }
}

/// Applies one plan, retrying it whole on transient errors (it is idempotent).
pub async fn apply_with_retry(sink: &mut Sink, plan: &Plan) -> Result<ApplyStats, CliError> {
    let mut attempt = 1;
    loop {
        match sink.apply(plan).await {
            Ok(s) => return Ok(s),
            Err(e) if e.retry_class() == RetryClass::BackOff && attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "applying the plan failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(CliError::runtime(e)),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(5)))
}

/// Runs `flush`.
pub async fn run(config_path: &Path, table: Option<&str>) -> Result<(), CliError> {
    let config = Config::load(config_path, &EnvOverrides::from_env())
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    let mappings = config
        .mappings
        .load()
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    let mapped: Vec<String> = mappings.tables().iter().map(|t| t.to_string()).collect();
    let mut planner = Planner::new(Arc::new(mappings), config.planner_context("flush"));
    let scope = match table {
        None => {
            planner.flush_all();
            format!("all {} mapped table(s)", mapped.len())
        }
        Some(t) => {
            let name = TableName::parse(t).map_err(CliError::Invalid)?;
            if !planner.flush_table(&name) {
                return Err(CliError::Invalid(format!(
                    "table {name} is not mapped; mapped tables: {}",
                    mapped.join(", ")
                )));
            }
            name.to_string()
        }
    };
    let plan = planner.take();
    let options = sink_options(&config)?;
    let mut sink = connect_sink(&options, &config.redis.cluster).await?;
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
