//! One worker process's loop of replication sessions: connect, stream, and on
//! a broken connection reconnect with backoff and resume from the slot; wait
//! as a standby while another worker holds the slot and take over when it is
//! free. A stop request stops reading, finishes and acknowledges the batch in
//! flight (within [`SHUTDOWN_GRACE`]), and returns.
//!
//! `cli/run.rs` loads the config, runs the start-up checks and builds a
//! [`Worker`]; everything that runs afterwards lives here.

use crate::log_fields::{ERROR, REASON, SLOT};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::auto_setup::{AutoSetup, SerialSetup};
use super::{BatchLimits, IdentityGuard};
use crate::ack::Acknowledger;
use crate::config::Config;
use crate::error::{Because, CliError};
use crate::lsn::Lsn;
use crate::map::Mappings;
use crate::plan::planner::Planner;
use crate::repeats::Repeats;
use crate::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::sink::{ApplySink, Sink, SinkOptions};
use crate::source::{
    self, ConnectionSettings, ReplicationConnection, RetryClass, SourceError, StreamControl,
    SystemIdentity,
};
use crate::telemetry::{SinkReporter, Telemetry};
use crate::visibility::replicas::{ReapplyFn, ReplicaContext};
use crate::visibility::{PrimaryVisibility, Replicas, VisibilityGate};

/// Items buffered between the socket and the planner.
const SOURCE_CHANNEL: usize = 4096;
/// Closed batches waiting for the sink (one applying, one ready).
const BATCH_CHANNEL: usize = 1;
/// How often a standby tries to take over the slot. A fixed poll, not
/// `retry::Backoff`: the slot being held is the normal state of a standby,
/// not a failure to back off from, and a growing delay would stretch the
/// takeover after the active worker dies (README guarantee 7: within ten
/// seconds). One replication connection attempt a second is what it costs.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// How long a graceful stop may take before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);

/// Why one streaming session ended.
enum SessionEnd {
    /// Graceful stop requested.
    Stopped,
    /// Retry after a delay.
    Retry(String, RetryClass),
    /// Another worker streams the slot: wait and try again (hot standby).
    Standby,
}

/// Everything one worker process needs to run its sessions.
pub struct Worker {
    config: Config,
    mappings: Arc<Mappings>,
    settings: ConnectionSettings,
    sink_options: SinkOptions,
    stop: Shutdown,
    telemetry: Arc<Telemetry>,
    /// `Some` with `auto_setup = true`.
    auto_setup: Option<Arc<SerialSetup>>,
    /// Set by the Redis probe after an outage (the sink re-verifies identity).
    redis_interrupted: Arc<AtomicBool>,
    /// Waiting for another worker's slot (logged once per wait).
    was_standby: AtomicBool,
    /// Wakes the publication watch: each new session re-reads the publication.
    publication_kick: Arc<tokio::sync::Notify>,
}

impl Worker {
    /// A worker for `config`, stopping when shutdown is requested; `auto_setup`
    /// is called when the slot is missing or lost under a running session
    /// (without it, that is an error telling the operator to run `setup`).
    pub fn new(
        config: Config,
        mappings: Arc<Mappings>,
        settings: ConnectionSettings,
        sink_options: SinkOptions,
        stop: Shutdown,
        telemetry: Arc<Telemetry>,
        auto_setup: Option<AutoSetup>,
    ) -> Self {
        Worker {
            config,
            mappings,
            settings,
            sink_options,
            stop,
            telemetry,
            auto_setup: auto_setup.map(|setup| Arc::new(SerialSetup::new(setup))),
            redis_interrupted: Arc::new(AtomicBool::new(false)),
            was_standby: AtomicBool::new(false),
            publication_kick: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.is_requested()
    }

    /// Sleeps `delay`, or less when a stop is requested.
    async fn pause(&self, delay: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            () = stop.requested() => {}
        }
    }

    /// Runs sessions until a stop is requested or an error is fatal.
    /// `preflight` (the start-up checks) runs at the same time as the first
    /// connections to Redis and PostgreSQL; nothing streams before it passed.
    pub async fn run(
        &self,
        preflight: impl Future<Output = Result<(), CliError>>,
    ) -> Result<(), CliError> {
        // The checks, the Redis connection and the replication connection at
        // once: a restart resumes streaming sooner. Nothing is streamed or
        // applied before the checks passed, and a failed check returns at
        // once, even while Redis is unreachable.
        let pre_connect = async {
            let mut conn = source::connect(&self.settings).await?;
            let system = conn.identify_system().await?;
            Ok((conn, system))
        };
        let ((), sink, replication) = tokio::try_join!(preflight, self.connect_sink(), async {
            Ok(pre_connect.await)
        })?;
        let mut replication = Some(replication);
        let Some(mut sink) = sink else {
            return Ok(());
        };
        sink.tune(&self.config.sink_tuning());
        tokio::spawn(super::probe::redis_probe(
            sink.clone(),
            Arc::clone(&self.telemetry),
            Arc::clone(&self.redis_interrupted),
            self.stop.clone(),
        ));
        tokio::spawn(super::publication::watch_publication(
            self.settings.clone(),
            Arc::clone(&self.mappings),
            self.config.postgres.publication.clone(),
            Arc::clone(&self.telemetry),
            Arc::clone(&self.publication_kick),
            self.auto_setup.clone(),
            self.stop.clone(),
        ));
        let mut gate = self.visibility_gate(&sink)?;
        let mut backoff = Backoff::new();
        let mut failures = Repeats::default();
        loop {
            if self.stopping() {
                return Ok(());
            }
            self.telemetry.touch();
            match self
                .session(&mut sink, &mut gate, replication.take())
                .await?
            {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Standby => self.pause(STANDBY_RETRY).await,
                SessionEnd::Retry(why, class) => {
                    self.telemetry.disconnected(&why);
                    // Fatal errors ended the loop already (session returns them).
                    let delay = backoff.delay_for(class).unwrap_or(STANDBY_RETRY);
                    if let Some(count) = failures.tick_for(&why) {
                        tracing::warn!({ ERROR } = %why, attempts = count, retry_in_ms = delay.as_millis() as u64, "replication stopped; resuming from the slot");
                    }
                    self.pause(delay).await;
                }
            }
        }
    }

    /// Guarantee 9: the primary's snapshot check (unless `visibility_check =
    /// false`) and the listed read replicas, whose pollers and re-appliers
    /// run for the whole process (a re-application queued in one session is
    /// not lost when the replication connection drops).
    fn visibility_gate(&self, sink: &Sink) -> Result<VisibilityGate, CliError> {
        let pg = &self.config.postgres;
        let metrics = Arc::clone(&self.telemetry.metrics);
        let health = Arc::clone(&self.telemetry.health);
        let primary = pg.visibility_check.then(|| {
            PrimaryVisibility::new(
                self.settings.clone(),
                Some(Arc::clone(&metrics)),
                Some(Arc::clone(&health)),
            )
        });
        if pg.replicas.is_empty() {
            return Ok(VisibilityGate::new(primary, None));
        }
        let mut settings = Vec::with_capacity(pg.replicas.len());
        for url in &pg.replicas {
            let mut s = ConnectionSettings::parse(url, None).map_err(|e| {
                CliError::invalid(Because::new(
                    "[postgres] replicas: an entry is not a valid connection string",
                    e,
                ))
            })?;
            if s.password.is_none() {
                s.password = pg.password.as_ref().map(|p| p.expose().to_string());
            }
            settings.push(s);
        }
        let reapply_sink = sink.clone();
        let reapply: ReapplyFn = Arc::new(move |plan| {
            let mut sink = reapply_sink.clone();
            Box::pin(async move {
                sink.apply(&plan)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        });
        let telemetry = Arc::clone(&self.telemetry);
        let mut planner = Planner::new(
            Arc::clone(&self.mappings),
            self.config
                .planner_context(format!("{}@replica-catch-up", pg.slot)),
        );
        planner.flush_all();
        let flush_plan = planner.take();
        let ctx = ReplicaContext {
            metrics: Some(metrics),
            health: Some(health),
            primary_wal_end: Arc::new(move || telemetry.wal_end_lsn()),
            reapply,
            flush_plan,
        };
        let replicas =
            Replicas::spawn(settings, Duration::from_millis(pg.replica_max_wait_ms), ctx);
        Ok(VisibilityGate::new(primary, Some(replicas)))
    }

    /// Connects to Redis, retrying with [`Backoff`] while it is unreachable;
    /// `None` when a stop is requested meanwhile.
    async fn connect_sink(&self) -> Result<Option<Sink>, CliError> {
        let mut repeats = Repeats::default();
        let mut backoff = Backoff::new();
        loop {
            match Sink::connect(&self.sink_options, self.config.redis.target.seeds()).await {
                Ok(sink) => return Ok(Some(sink)),
                Err(err) => {
                    let Some(delay) = backoff.delay_for(err.retry_class()) else {
                        return Err(CliError::invalid(err));
                    };
                    // Once, then a line with a count every 30 s.
                    if let Some(count) = repeats.tick_for(&err.to_string()) {
                        tracing::warn!({ ERROR } = %err, attempts = count, retry_in_ms = delay.as_millis() as u64, "Redis unreachable; retrying");
                    }
                    self.pause(delay).await;
                    if self.stopping() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// One connection's worth of streaming. `connected` is the first
    /// session's connection (or why it failed), opened during the start-up
    /// checks; later sessions connect themselves.
    async fn session(
        &self,
        sink: &mut Sink,
        gate: &mut VisibilityGate,
        connected: Option<Result<(ReplicationConnection, SystemIdentity), SourceError>>,
    ) -> Result<SessionEnd, CliError> {
        let pg = &self.config.postgres;
        let retry = |err: SourceError| -> Result<SessionEnd, CliError> {
            match err.retry_class() {
                // Dropped under us: `setup` repairs it (the publication watch
                // says so on /readyz); keep trying meanwhile, with backoff.
                _ if matches!(err, SourceError::PublicationMissing { .. }) => Ok(
                    SessionEnd::Retry(err.to_string(), RetryClass::BackOffAndRetry),
                ),
                RetryClass::Fatal => Err(CliError::runtime(err)),
                class => Ok(SessionEnd::Retry(err.to_string(), class)),
            }
        };
        // Every (re)connect re-reads the publication.
        self.publication_kick.notify_one();
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
        // Read before streaming: after a promotion, a slot synchronized from
        // the former primary resumes without the identity check's flush.
        let slot_synced = match source::slot_synced(&mut conn, &pg.slot).await {
            Ok(synced) => synced,
            Err(err) if err.retry_class() == RetryClass::Fatal => {
                tracing::warn!({ SLOT } = %pg.slot, { ERROR } = %err, "cannot tell whether the slot was synchronized from a former primary; a timeline change will flush");
                false
            }
            Err(err) => return retry(err),
        };
        if let Err(err) = source::start_replication(&mut conn, &pg.slot, &pg.publication).await {
            if matches!(
                err,
                SourceError::SlotMissing { .. } | SourceError::SlotLost { .. }
            ) {
                // Dropped or invalidated under us: changes since the last
                // acknowledgement are unknown. Recreating the slot emits the
                // flush:all marker; without auto_setup the operator runs setup.
                let Some(setup) = &self.auto_setup else {
                    return Err(CliError::invalid(err));
                };
                tracing::warn!({ SLOT } = %pg.slot, { ERROR } = %err, "auto_setup: recreating the replication slot; its flush marker flushes every mapped table");
                setup.run().await?;
                return Ok(SessionEnd::Retry(err.to_string(), RetryClass::Reconnect));
            }
            if matches!(err, SourceError::SlotActive { .. }) {
                self.telemetry.standby();
                if !self.was_standby.swap(true, Ordering::Relaxed) {
                    tracing::info!({ SLOT } = %pg.slot, { REASON } = %err, "standby: another worker streams this slot; waiting to take over");
                }
                return Ok(SessionEnd::Standby);
            }
            return retry(err);
        }
        self.telemetry.streaming();
        if self.was_standby.swap(false, Ordering::Relaxed) {
            tracing::info!({ SLOT } = %pg.slot, "took over the slot: streaming");
        }
        let heartbeat = tokio::spawn(super::heartbeat::heartbeat(
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
            slot_synced,
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
            let plan = super::plan_stage(
                items_rx,
                batch_tx,
                &mut planner,
                limits,
                self.stop.clone(),
                &self.telemetry,
            );
            let apply = async {
                let result =
                    super::sink_stage(batch_rx, sink, &mut ack, &guard, gate, &mut observer).await;
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
            return Err(CliError::invalid(err));
        }
        if let Err(err) = plan_result {
            // Undecodable stream: reconnecting resends the same bytes.
            return Err(CliError::runtime(err));
        }
        if let (Err(err @ SourceError::PublicationMissing { .. }), Some(setup)) =
            (&stream_result, &self.auto_setup)
        {
            // The slot cannot decode past the gap; setup recreates the
            // publication and the slot, with a flush marker for everything.
            tracing::warn!({ ERROR } = %err, "auto_setup: recreating the publication (and the slot, with a full flush) after it was dropped");
            setup.run().await?;
            return Ok(SessionEnd::Retry(err.to_string(), RetryClass::Reconnect));
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
    async fn with_grace<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        let mut stop = self.stop.clone();
        tokio::select! {
            out = &mut fut => return Some(out),
            () = stop.requested() => {}
        }
        tokio::time::timeout(SHUTDOWN_GRACE, fut).await.ok()
    }
}
