//! The publication watch: the worker re-reads its publication on every
//! (re)connect and every [`INTERVAL`], and reports what it hides from the
//! mappings (publication drift: a publish action, a table, a row filter, a
//! column list, `publish_via_partition_root`, the publication itself) on
//! `/readyz` (503 with the reason), in one log line per new set of problems
//! (with what to run) and in `cache_invalidator_publication_drift`. Changes
//! made while the publication hid them were never sent: `setup` repairs the
//! publication and emits the flush markers for what it changed
//! (docs/failure-modes.md, "The publication changed").

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::log_fields::{ERROR, REASON};
use crate::map::catalog::publication_drift;
use crate::map::{Mappings, TableName};
use crate::shutdown::Shutdown;
use crate::source::{self, ConnectionSettings, SqlClient};
use crate::telemetry::Telemetry;

/// How often the publication is re-read between (re)connects.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Re-reads the publication every [`INTERVAL`] and whenever `kick` is
/// notified (each new replication session), until `stop`.
pub(super) async fn watch_publication(
    settings: ConnectionSettings,
    mappings: Arc<Mappings>,
    publication: String,
    telemetry: Arc<Telemetry>,
    kick: Arc<Notify>,
    mut stop: Shutdown,
) {
    let tables: Vec<TableName> = mappings.tables().into_iter().cloned().collect();
    let mut tick = tokio::time::interval(INTERVAL);
    let mut sql: Option<SqlClient> = None;
    let mut last: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            () = stop.requested() => return,
            _ = tick.tick() => {}
            _ = kick.notified() => {}
        }
        if sql.is_none() {
            match source::connect_sql(&settings).await {
                Ok(c) => sql = Some(c),
                Err(err) => {
                    tracing::debug!({ ERROR } = %err, "publication watch: no SQL connection; retrying");
                    continue;
                }
            }
        }
        let Some(client) = sql.as_ref() else { continue };
        let snap = match crate::pg::catalog::snapshot(client.client(), &tables, &publication).await
        {
            Ok(snap) => snap,
            Err(err) => {
                tracing::debug!({ ERROR } = %err, "publication watch: reading the catalog failed; reconnecting");
                sql = None;
                continue;
            }
        };
        let drift = publication_drift(&mappings, &snap, &publication);
        report(&telemetry, &publication, &last, &drift);
        last = drift;
    }
}

/// Reports a new reading: logged when the set of problems changed, counted
/// when new problems appeared, cleared when they are gone.
fn report(telemetry: &Telemetry, publication: &str, last: &[String], now: &[String]) {
    if now.is_empty() {
        if !last.is_empty() {
            tracing::info!(
                publication,
                "publication drift repaired: the publication publishes every change the mappings need again"
            );
        }
        telemetry.metrics.set_publication_drift(None);
        telemetry.health.set_drift(None);
        return;
    }
    let new = now != last;
    if new {
        tracing::error!(
            publication,
            { REASON } = %now.join("; "),
            "publication drift: changes of mapped tables are not sent, so their caches go stale; run `cache-invalidator setup`, which repairs the publication and flushes the tables whose changes were hidden"
        );
    }
    telemetry
        .metrics
        .set_publication_drift(Some(new && !now.iter().all(|l| last.contains(l))));
    telemetry.health.set_drift(Some(now.join("; ")));
}
