//! The heartbeat: `pg_logical_emit_message(false, 'cache-invalidator',
//! 'heartbeat')` on a timer over a SQL connection. Its return through the
//! stream (the plan stage sees it) measures end-to-end lag even when the
//! mapped tables are idle.

use std::sync::Arc;

use crate::log_fields::ERROR;
use crate::pg;
use crate::shutdown::Shutdown;
use crate::source::{ConnectionSettings, RetryClass};
use crate::telemetry::{Telemetry, HEARTBEAT_INTERVAL};

/// Emits `pg_logical_emit_message(false, 'cache-invalidator', 'heartbeat')`
/// every [`HEARTBEAT_INTERVAL`]; its return through the stream measures
/// end-to-end lag even when the mapped tables are idle. A role not allowed to
/// emit messages disables it with one log line.
pub(super) async fn heartbeat(
    settings: ConnectionSettings,
    telemetry: Arc<Telemetry>,
    mut stop: Shutdown,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut sql = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.requested() => return,
        }
        if sql.is_none() {
            match pg::connect(&settings).await {
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
