//! `cache-invalidator run`: the worker in the foreground.
//!
//! Startup checks (read-only unless `auto_setup`), then a loop: connect,
//! stream, and on a broken connection reconnect with backoff and resume from
//! the slot. SIGINT/SIGTERM stop reading, finish and acknowledge the batch in
//! flight, and exit 0.

use crate::log_fields::{ERROR, REASON, SLOT};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::ack::Acknowledger;
use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::lsn::Lsn;
use crate::map::Mappings;
use crate::plan::planner::Planner;
use crate::sink::{Sink, SinkOptions};
use crate::source::{
    self, ConnectionSettings, ReplicationConnection, RetryClass, SourceError, StreamControl,
    SystemIdentity,
};
use crate::telemetry::{SinkReporter, Telemetry, HEARTBEAT_INTERVAL};
use crate::worker::{self, Backoff, BatchLimits, IdentityGuard};

/// Items buffered between the socket and the planner.
const SOURCE_CHANNEL: usize = 4096;
/// Closed batches waiting for the sink (one applying, one ready).
const BATCH_CHANNEL: usize = 1;
/// How often a standby tries to take over the slot.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// How long a graceful stop may take before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);

/// Runs the worker until SIGINT/SIGTERM or a fatal error.
pub async fn run(config_path: &Path) -> Result<(), CliError> {
    let config = Config::load(config_path, &EnvOverrides::from_env())
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    let mappings = Arc::new(
        config
            .mappings
            .load()
            .map_err(|e| CliError::Invalid(e.to_string()))?,
    );
    let settings = ConnectionSettings::parse(
        &config.postgres.url,
        config
            .postgres
            .password
            .as_ref()
            .map(|s| s.expose().to_string()),
    )
    .map_err(|e| CliError::Invalid(e.to_string()))?;
    // With `[redis] cluster`, the seed URLs are used and `url` is not.
    let redis_url = match (&config.redis.url, config.redis.cluster.is_empty()) {
        (_, false) => String::new(),
        (Some(url), true) => url.clone(),
        (None, true) => {
            return Err(CliError::Invalid(
                "[redis] needs `url` (one server) or `cluster` (seed URLs of a Redis Cluster)"
                    .into(),
            ))
        }
    };
    let sink_options = SinkOptions {
        url: redis_url,
        password: config
            .redis
            .password
            .as_ref()
            .map(|s| s.expose().to_string()),
        wait_replicas: config.redis.wait_replicas,
        redelete_after: (config.worker.redelete_after_ms > 0)
            .then(|| Duration::from_millis(config.worker.redelete_after_ms)),
        tls: config.redis.tls.clone(),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    spawn_signal_handler(stop_tx);

    let telemetry = Telemetry::new();
    if let Some(listen) = &config.metrics.listen {
        let addr: std::net::SocketAddr = listen.parse().map_err(|e| {
            CliError::Invalid(format!(
                "[metrics] listen = {listen:?} is not an address like 127.0.0.1:9464: {e}"
            ))
        })?;
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|e| CliError::Invalid(e.to_string()))?;
        tracing::info!(listen = %addr, "serving /metrics, /livez, /readyz");
        tokio::spawn(crate::metrics::serve_on(
            listener,
            Arc::clone(&telemetry.metrics),
            Arc::clone(&telemetry.health),
            stop_rx.clone(),
        ));
    }

    let worker = Worker {
        config,
        mappings,
        settings,
        sink_options,
        stop: stop_rx,
        telemetry,
        was_standby: std::sync::atomic::AtomicBool::new(false),
        redis_interrupted: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    worker.run().await
}

fn spawn_signal_handler(stop: watch::Sender<bool>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!({ ERROR } = %err, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: finishing and acknowledging the batch in flight");
        let _ = stop.send(true);
    });
}

/// Why one streaming session ended.
enum SessionEnd {
    /// Graceful stop requested.
    Stopped,
    /// Retry after a delay.
    Retry(String, RetryClass),
    /// Another worker streams the slot: wait and try again (hot standby).
    Standby,
}

struct Worker {
    config: Config,
    mappings: Arc<Mappings>,
    settings: ConnectionSettings,
    sink_options: SinkOptions,
    stop: watch::Receiver<bool>,
    telemetry: Arc<Telemetry>,
    /// Set by the Redis probe after an outage (the sink re-verifies identity).
    redis_interrupted: Arc<std::sync::atomic::AtomicBool>,
    /// Waiting for another worker's slot (logged once per wait).
    was_standby: std::sync::atomic::AtomicBool,
}

impl Worker {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `delay`, or less when a stop is requested.
    async fn pause(&self, delay: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    async fn run(&self) -> Result<(), CliError> {
        // The checks, the Redis connection and the replication connection at
        // once: a restart resumes streaming sooner. Nothing is streamed or
        // applied before the checks passed, and a failed check returns at
        // once, even while Redis is unreachable.
        let pre_connect = async {
            let mut conn = source::connect(&self.settings).await?;
            let system = conn.identify_system().await?;
            Ok((conn, system))
        };
        let ((), sink, replication) =
            tokio::try_join!(self.preflight(), self.connect_sink(), async {
                Ok(pre_connect.await)
            })?;
        let mut replication = Some(replication);
        let Some(mut sink) = sink else {
            return Ok(());
        };
        sink.set_tombstone_hold(Duration::from_millis(self.config.worker.tombstone_ms));
        tokio::spawn(redis_probe(
            sink.clone(),
            Arc::clone(&self.telemetry),
            Arc::clone(&self.redis_interrupted),
            self.stop.clone(),
        ));
        let mut backoff = Backoff::new();
        let mut last_error = String::new();
        loop {
            if self.stopping() {
                return Ok(());
            }
            self.telemetry.touch();
            match self.session(&mut sink, replication.take()).await? {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Standby => self.pause(STANDBY_RETRY).await,
                SessionEnd::Retry(why, class) => {
                    self.telemetry.disconnected(&why);
                    let delay = match class {
                        RetryClass::Reconnect => Duration::from_millis(200),
                        _ => backoff.next_delay(),
                    };
                    if why != last_error {
                        tracing::warn!({ ERROR } = %why, retry_in_ms = delay.as_millis() as u64, "replication stopped; resuming from the slot");
                        last_error = why;
                    }
                    self.pause(delay).await;
                }
            }
        }
    }

    /// Connects to Redis, retrying every second while it is unreachable;
    /// `None` when a stop is requested meanwhile.
    async fn connect_sink(&self) -> Result<Option<Sink>, CliError> {
        loop {
            match Sink::connect(&self.sink_options, &self.config.redis.cluster).await {
                Ok(sink) => return Ok(Some(sink)),
                Err(err) if err.retry_class() == crate::sink::RetryClass::Fatal => {
                    return Err(CliError::Invalid(err.to_string()))
                }
                Err(err) => {
                    tracing::warn!({ ERROR } = %err, "Redis unreachable; retrying");
                    self.pause(Duration::from_secs(1)).await;
                    if self.stopping() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// `auto_setup = true`: what `setup` does (publication, slot, flush
    /// markers; a lost slot recreated), before the read-only checks and again
    /// whenever the slot turns out missing or lost.
    async fn auto_setup(&self) -> Result<(), CliError> {
        tracing::info!("auto_setup: running setup (publication, slot, flush markers)");
        super::setup::run(&self.config.path, false).await
    }

    /// Read-only checks (after `auto_setup`): the publication and the slot exist.
    async fn preflight(&self) -> Result<(), CliError> {
        let pg = &self.config.postgres;
        if pg.auto_setup {
            self.auto_setup().await?;
        }
        let setup_cmd = format!(
            "cache-invalidator setup --config {}",
            self.config.path.display()
        );
        let sql = match source::connect_sql(&self.settings).await {
            Ok(sql) => sql,
            Err(err) if err.retry_class() == RetryClass::Fatal => {
                return Err(CliError::runtime(err))
            }
            // Unreachable now: the session loop retries.
            Err(err) => {
                tracing::warn!({ ERROR } = %err, "PostgreSQL unreachable at start; will retry");
                return Ok(());
            }
        };
        if !sql
            .publication_exists(&pg.publication)
            .await
            .map_err(CliError::runtime)?
        {
            return Err(CliError::Invalid(format!(
                "publication {:?} does not exist in {}; create it (and the slot) with:\n  {setup_cmd}",
                pg.publication,
                sql.url()
            )));
        }
        match sql.slot_info(&pg.slot).await.map_err(CliError::runtime)? {
            None => Err(CliError::Invalid(format!(
                "replication slot {:?} does not exist in {}; create it (and the publication) with:\n  {setup_cmd}",
                pg.slot,
                sql.url()
            ))),
            Some(info) if info.is_lost() => Err(CliError::Invalid(format!(
                "replication slot {:?} lost WAL it needed (wal_status = 'lost'): invalidations in that gap are unknown. Recreate it and flush with:\n  {setup_cmd}",
                pg.slot
            ))),
            Some(_) => Ok(()),
        }?;
        self.check_catalog(&sql).await
    }

    /// What `check` refuses, `run` refuses too (exit 2): a rule whose old values
    /// the replica identity does not carry, a publication hiding a mapped
    /// column, ... and an `allkeys-*` eviction policy that would evict tag sets
    /// and version keys.
    async fn check_catalog(&self, sql: &source::SqlClient) -> Result<(), CliError> {
        use crate::map::catalog::{check_catalog, Severity};
        let pg = &self.config.postgres;
        let tables: Vec<crate::map::TableName> =
            self.mappings.tables().into_iter().cloned().collect();
        let (snap, policy) = tokio::join!(
            crate::pg::catalog::snapshot(sql.client(), &tables, &pg.publication),
            super::check::redis_maxmemory_policy(&self.config)
        );
        let snap = snap.map_err(CliError::runtime)?;
        let findings = check_catalog(&self.mappings, &snap, crate::pg::APPLICATION_NAME);
        let mut errors = Vec::new();
        for f in findings {
            match f.severity {
                Severity::Error => errors.push(f.to_string()),
                Severity::Warning => tracing::warn!(finding = %f, "check"),
            }
        }
        if let Ok(policy) = policy {
            if policy.starts_with("allkeys-") {
                errors.push(format!(
                    "Redis maxmemory-policy is {policy}: it evicts tag sets and version keys, which silently loses invalidations; use noeviction or a volatile-* policy"
                ));
            }
        }
        if errors.is_empty() {
            return Ok(());
        }
        Err(CliError::Invalid(format!(
            "refusing to run:\n{}\n(`cache-invalidator check --config {}` shows the same)",
            errors.join("\n"),
            self.config.path.display()
        )))
    }

    /// One connection's worth of streaming. `connected` is the first
    /// session's connection (or why it failed), opened during the start-up
    /// checks; later sessions connect themselves.
    async fn session(
        &self,
        sink: &mut Sink,
        connected: Option<Result<(ReplicationConnection, SystemIdentity), SourceError>>,
    ) -> Result<SessionEnd, CliError> {
        let pg = &self.config.postgres;
        let retry = |err: SourceError| -> Result<SessionEnd, CliError> {
            match err.retry_class() {
                RetryClass::Fatal => Err(CliError::runtime(err)),
                class => Ok(SessionEnd::Retry(err.to_string(), class)),
            }
        };
        let (mut conn, system) = match connected {
            Some(Ok(pair)) => pair,
            Some(Err(err)) => return retry(err),
            None => {
                let mut conn = match source::connect(&self.settings).await {
                    Ok(c) => c,
                    Err(err) => return retry(err),
                };
                match conn.identify_system().await {
                    Ok(system) => (conn, system),
                    Err(err) => return retry(err),
                }
            }
        };
        if let Err(err) = source::start_replication(&mut conn, &pg.slot, &pg.publication).await {
            if matches!(
                err,
                SourceError::SlotMissing { .. } | SourceError::SlotLost { .. }
            ) {
                // Dropped or invalidated under us: changes since the last
                // acknowledgement are unknown. Recreating the slot emits the
                // flush:all marker; without auto_setup the operator runs setup.
                if !pg.auto_setup {
                    return Err(CliError::Invalid(err.to_string()));
                }
                tracing::warn!({ SLOT } = %pg.slot, { ERROR } = %err, "auto_setup: recreating the replication slot; its flush marker flushes every mapped table");
                self.auto_setup().await?;
                return Ok(SessionEnd::Retry(err.to_string(), RetryClass::Reconnect));
            }
            if matches!(err, SourceError::SlotActive { .. }) {
                self.telemetry.standby();
                if !self
                    .was_standby
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!({ SLOT } = %pg.slot, { REASON } = %err, "standby: another worker streams this slot; waiting to take over");
                }
                return Ok(SessionEnd::Standby);
            }
            return retry(err);
        }
        self.telemetry.streaming();
        if self
            .was_standby
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!({ SLOT } = %pg.slot, "took over the slot: streaming");
        }
        let heartbeat = tokio::spawn(heartbeat(
            self.settings.clone(),
            Arc::clone(&self.telemetry),
            self.stop.clone(),
        ));

        let epoch = format!("{}@{}", pg.slot, system.system_id);
        let mut planner = Planner::new(
            Arc::clone(&self.mappings),
            self.config.planner_context(epoch),
        );
        planner.flush_all();
        let flush_plan = planner.take();
        let _ = planner.take_fallbacks();
        let guard = IdentityGuard {
            key: crate::sink::identity::identity_key(&pg.slot),
            pg_system_id: system.system_id.clone(),
            pg_timeline: system.timeline,
            flush_plan,
            recheck: Arc::clone(&self.redis_interrupted),
        };
        let limits = BatchLimits {
            max_delay: Duration::from_millis(self.config.worker.max_batch_delay_ms),
            max_ops: self.config.worker.max_batch_ops,
        };

        let (mut ack, ack_rx) = Acknowledger::new(Lsn::ZERO);
        let (items_tx, items_rx) = mpsc::channel(SOURCE_CHANNEL);
        let (batch_tx, batch_rx) = mpsc::channel(BATCH_CHANNEL);
        let stream = source::spawn_stream(
            conn,
            items_tx,
            StreamControl {
                acked: ack_rx,
                stop: self.stop.clone(),
            },
        );
        let mut observer = SinkReporter::new(Arc::clone(&self.telemetry));
        let pipeline = async {
            let plan = worker::plan_stage(
                items_rx,
                batch_tx,
                &mut planner,
                limits,
                self.stop.clone(),
                &self.telemetry,
            );
            let apply = async {
                let result =
                    worker::sink_stage(batch_rx, sink, &mut ack, &guard, &mut observer).await;
                // Dropping the acknowledger tells the stream the pipeline drained.
                drop(ack);
                result
            };
            tokio::join!(plan, apply)
        };
        let (plan_result, sink_result) = self.with_grace(pipeline).await.unwrap_or_else(|| {
            tracing::warn!(
                "stop grace period elapsed with a batch unapplied; it will be delivered again"
            );
            (Ok(()), Ok(()))
        });
        heartbeat.abort();
        let stream_result = match tokio::time::timeout(Duration::from_secs(6), stream).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => return Err(CliError::runtime(join)),
            Err(_) => Ok(()),
        };
        if let Err(err) = sink_result {
            return Err(CliError::Invalid(err.to_string()));
        }
        if let Err(err) = plan_result {
            // Undecodable stream: reconnecting resends the same bytes.
            return Err(CliError::runtime(err));
        }
        match stream_result {
            Ok(()) if self.stopping() => Ok(SessionEnd::Stopped),
            Ok(()) => Ok(SessionEnd::Retry(
                "the replication stream ended".into(),
                RetryClass::Reconnect,
            )),
            Err(err) => retry(err),
        }
    }

    /// Runs `fut`; once a stop is requested, gives it [`SHUTDOWN_GRACE`] more.
    async fn with_grace<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        let mut stop = self.stop.clone();
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = stop.wait_for(|s| *s) => {}
        }
        tokio::time::timeout(SHUTDOWN_GRACE, fut).await.ok()
    }
}

/// Emits `pg_logical_emit_message(false, 'cache-invalidator', 'heartbeat')`
/// every [`HEARTBEAT_INTERVAL`]; its return through the stream measures
/// end-to-end lag even when the mapped tables are idle. A role not allowed to
/// emit messages disables it with one log line.
async fn heartbeat(
    settings: ConnectionSettings,
    telemetry: Arc<Telemetry>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut sql = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if sql.is_none() {
            match source::connect_sql(&settings).await {
                Ok(c) => sql = Some(c),
                Err(err) => {
                    tracing::debug!({ ERROR } = %err, "heartbeat: no SQL connection; retrying");
                    continue;
                }
            }
        }
        let Some(client) = sql.as_ref() else { continue };
        match client
            .emit_message(false, crate::plan::planner::MESSAGE_PREFIX, "heartbeat")
            .await
        {
            Ok(lsn) => telemetry.heartbeat_sent(lsn),
            Err(err) if err.retry_class() == RetryClass::Fatal => {
                tracing::info!({ ERROR } = %err, "heartbeat disabled: this role cannot emit logical messages");
                return;
            }
            Err(err) => {
                tracing::debug!({ ERROR } = %err, "heartbeat failed; reconnecting");
                sql = None;
            }
        }
    }
}

/// How often Redis is pinged while the stream is idle.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Pings Redis on a timer so `/readyz` reflects an outage even when no batch
/// is in flight; after an outage the sink verifies the Redis identity again
/// before its next batch.
async fn redis_probe(
    sink: Sink,
    telemetry: Arc<Telemetry>,
    interrupted: Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(REDIS_PROBE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let ping = tokio::time::timeout(REDIS_PROBE_INTERVAL * 2, sink.ping()).await;
        match ping {
            Ok(Ok(_)) => telemetry.health.set_redis_reachable(),
            Ok(Err(err)) => {
                interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
                telemetry.health.set_redis_unreachable(err.to_string());
            }
            Err(_) => {
                interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
                telemetry
                    .health
                    .set_redis_unreachable(format!("{}: PING timed out", sink.target()));
            }
        }
    }
}
