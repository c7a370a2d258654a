//! The Redis probe: a PING on a timer, so `/readyz` reflects a Redis outage
//! even while no batch is in flight, and the sink stage verifies the Redis
//! identity again after one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use crate::sink::ApplySink;
use crate::telemetry::Telemetry;

/// How often Redis is pinged while the stream is idle.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Pings Redis on a timer so `/readyz` reflects an outage even when no batch
/// is in flight; after an outage the sink verifies the Redis identity again
/// before its next batch.
pub(super) async fn redis_probe<S: ApplySink + Sync + 'static>(
    sink: S,
    telemetry: Arc<Telemetry>,
    interrupted: Arc<AtomicBool>,
    mut stop: Shutdown,
) {
    let mut tick = tokio::time::interval(REDIS_PROBE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.requested() => return,
        }
        let ping = tokio::time::timeout(REDIS_PROBE_INTERVAL * 2, sink.ping()).await;
        match ping {
            Ok(Ok(_)) => telemetry.health.set_redis_reachable(),
            Ok(Err(err)) => {
                interrupted.store(true, Ordering::Relaxed);
                telemetry.health.set_redis_unreachable(err.to_string());
            }
            Err(_) => {
                interrupted.store(true, Ordering::Relaxed);
                telemetry
                    .health
                    .set_redis_unreachable(format!("{}: PING timed out", sink.target()));
            }
        }
    }
}
