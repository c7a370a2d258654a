//! `cache-invalidator run`: the worker in the foreground.
//!
//! Loads and validates the config, runs the start-up checks (read-only unless
//! `auto_setup`), serves the metrics endpoint, installs the SIGINT/SIGTERM
//! handler and hands over to [`crate::worker::Worker`], which owns the
//! session loop and the pipeline.

use crate::log_fields::ERROR;
use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::config::{Config, EnvOverrides};
use crate::error::CliError;
use crate::map::Mappings;
use crate::shutdown::ShutdownTrigger;
use crate::source::ConnectionSettings;
use crate::telemetry::Telemetry;
use crate::worker::{AutoSetup, Worker};

/// Runs the worker until SIGINT/SIGTERM or a fatal error.
pub async fn run(config_path: &Path) -> Result<(), CliError> {
    let config = Config::load(config_path, &EnvOverrides::from_env()).map_err(CliError::invalid)?;
    let mappings = Arc::new(config.mappings.load().map_err(CliError::invalid)?);
    let settings = ConnectionSettings::parse(
        &config.postgres.url,
        config
            .postgres
            .password
            .as_ref()
            .map(|s| s.expose().to_string()),
    )
    .map_err(CliError::invalid)?;
    let sink_options = config.worker_sink_options();

    let (trigger, stop_rx) = ShutdownTrigger::new();
    spawn_signal_handler(trigger);

    let telemetry = Telemetry::new();
    let tables: Vec<String> = mappings.tables().iter().map(|t| t.to_string()).collect();
    let reasons = crate::plan::FallbackReason::ALL.map(crate::plan::FallbackReason::as_str);
    telemetry
        .metrics
        .start_at_zero(&tables, &reasons, &crate::sink::SinkError::KINDS);
    if let Some(addr) = config.metrics.listen {
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(CliError::invalid)?;
        tracing::info!(listen = %addr, "serving /metrics, /livez, /readyz");
        tokio::spawn(crate::metrics::serve_on(
            listener,
            Arc::clone(&telemetry.metrics),
            Arc::clone(&telemetry.health),
            stop_rx.clone(),
        ));
    }

    let checks = Preflight {
        config: config.clone(),
        mappings: Arc::clone(&mappings),
        telemetry: Arc::clone(&telemetry),
    };
    let auto_setup: Option<AutoSetup> = config.postgres.auto_setup.then(|| {
        let path = config.path.clone();
        Box::new(move || -> BoxFuture<'static, Result<(), CliError>> {
            let path = path.clone();
            Box::pin(async move { run_auto_setup(&path).await })
        }) as AutoSetup
    });
    let worker = Worker::new(
        config,
        mappings,
        settings,
        sink_options,
        stop_rx,
        telemetry,
        auto_setup,
    );
    worker.run(checks.run()).await
}

/// Fires `trigger` on SIGINT or SIGTERM. The task keeps the trigger for the
/// life of the process (a dropped trigger is a shutdown): when one signal
/// cannot be listened for, it logs that and waits for the other.
fn spawn_signal_handler(trigger: ShutdownTrigger) {
    // SIGHUP (a terminal closing, `systemctl reload`) must not kill the
    // worker: listening replaces the default action. Reloading is not
    // supported; the signal is logged and otherwise ignored.
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP ignored: the worker does not reload its config; restart it to apply changes");
            }
        });
    }
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(err) => {
                    tracing::error!({ ERROR } = %err, "cannot listen for SIGTERM; SIGINT still stops the worker");
                    std::future::pending::<()>().await;
                }
            }
        };
        let int = async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!({ ERROR } = %err, "cannot listen for SIGINT; SIGTERM still stops the worker");
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = int => {}
            () = term => {}
        }
        tracing::info!("stopping: finishing and acknowledging the batch in flight");
        trigger.trigger();
        // Keep the trigger: the listeners already see the shutdown.
        std::future::pending::<()>().await;
    });
}

/// `auto_setup = true`: what `setup` does (publication, slot, flush
/// markers; a lost slot recreated), before the read-only checks and again
/// whenever the slot turns out missing or lost.
async fn run_auto_setup(config_path: &Path) -> Result<(), CliError> {
    tracing::info!("auto_setup: running setup (publication, slot, flush markers)");
    super::setup::run(config_path, &super::setup::SetupOptions::default()).await
}

/// The start-up checks, run while the worker connects.
struct Preflight {
    config: Config,
    mappings: Arc<Mappings>,
    telemetry: Arc<Telemetry>,
}

impl Preflight {
    /// The start-up checks (after `auto_setup`), the very function `check`
    /// prints: [`crate::preflight::preflight`]. Errors refuse the start; a
    /// broken table is reported and runs in fallback; an unreachable server
    /// is retried by the session loop.
    async fn run(self) -> Result<(), CliError> {
        if self.config.postgres.auto_setup {
            run_auto_setup(&self.config.path).await?;
        }
        let report = crate::preflight::preflight(&self.config, &self.mappings).await;
        if let Some(refusal) = report.refusal(&self.config) {
            return Err(refusal);
        }
        for f in report.of(crate::map::catalog::Severity::Warning) {
            tracing::warn!(finding = %f, "check");
        }
        if let crate::preflight::Reach::Unreachable(why) = &report.postgres {
            tracing::warn!({ ERROR } = %why, "PostgreSQL unreachable at start; will retry");
        }
        self.telemetry.broken_tables(&report.broken);
        Ok(())
    }
}
