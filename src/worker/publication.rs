//! The publication watch: the worker re-reads its publication on every
//! (re)connect and every [`INTERVAL`], and reports what it hides from the
//! mappings (publication drift: a publish action, a table, a row filter, a
//! column list, `publish_via_partition_root`, the publication itself) on
//! `/readyz` (503 with the reason), in one log line per new set of problems
//! (with what to run) and in `cache_invalidator_publication_drift`.
//!
//! Changes made while the publication hid them were never sent. `setup`
//! repairs the publication and emits the flush markers for what it changed;
//! a repair by hand (`CREATE PUBLICATION` after a drop, `ALTER PUBLICATION
//! ... ADD TABLE` or `SET (publish = ...)`) is seen here: the watch
//! remembers which tables may have been hidden since (every table while the
//! publication is missing, or when its OID changed between two readings:
//! dropped and recreated) and, once the publication publishes them again,
//! emits the same transactional flush markers `setup` emits, so they are
//! applied in commit order after the gap and a crash after the emission
//! cannot lose them (docs/failure-modes.md, "The publication changed").

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::auto_setup::SerialSetup;
use crate::log_fields::{ERROR, REASON};
use crate::map::catalog::{hidden_tables, publication_drift};
use crate::map::{Mappings, TableName};
use crate::pg::{self, SqlClient};
use crate::repeats::Repeats;
use crate::shutdown::Shutdown;
use crate::source::ConnectionSettings;
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
    auto_setup: Option<Arc<SerialSetup>>,
    mut stop: Shutdown,
) {
    let tables: Vec<TableName> = mappings.tables().into_iter().cloned().collect();
    let mut tick = tokio::time::interval(INTERVAL);
    let mut sql: Option<SqlClient> = None;
    let mut last: Vec<String> = Vec::new();
    let mut gaps = Gaps::default();
    let mut drifts = Repeats::default();
    let mut emit_failures = Repeats::default();
    let mut setup_runs = Repeats::default();
    let mut setup_failures = Repeats::default();
    loop {
        tokio::select! {
            () = stop.requested() => return,
            _ = tick.tick() => {}
            _ = kick.notified() => {}
        }
        if sql.is_none() {
            match pg::connect(&settings).await {
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
        report(&telemetry, &publication, &last, &drift, &mut drifts);
        last = drift;
        let due = gaps.reading(
            snap.publication.as_ref().map(|p| p.oid),
            &hidden_tables(&mappings, &snap),
        );
        if !due.is_empty() {
            match emit(client, &publication, &due).await {
                Ok(()) => {
                    emit_failures.clear();
                }
                Err(err) => {
                    if let Some(count) = emit_failures.tick_for(&err.to_string()) {
                        tracing::error!(publication, { ERROR } = %err, attempts = count, "publication repaired, but its flush marker could not be emitted; retrying (or run `cache-invalidator flush`)");
                    }
                    gaps.put_back(due);
                    sql = None;
                }
            }
        }
        if let (None, Some(setup)) = (&snap.publication, &auto_setup) {
            // PostgreSQL 18 streams past a missing publication (before 18 the
            // session's stream fails and runs setup itself; one at a time).
            if let Some(count) = setup_runs.tick() {
                tracing::warn!(publication, attempts = count, "auto_setup: recreating the publication (and the slot, with a full flush) after it was dropped");
            }
            match setup.run().await {
                Ok(()) => {
                    setup_runs.clear();
                    setup_failures.clear();
                }
                Err(err) => {
                    if let Some(count) = setup_failures.tick_for(&err.to_string()) {
                        tracing::error!(publication, { ERROR } = %err, attempts = count, "auto_setup could not recreate the publication; retrying at the next reading (or run `cache-invalidator setup`)");
                    }
                }
            }
        }
    }
}

/// The flushes a publication repaired by hand needs: a full one after it
/// was missing or recreated, else one per table it published again.
#[derive(Debug, Default, PartialEq, Eq)]
struct Due {
    all: bool,
    tables: Vec<TableName>,
}

impl Due {
    fn is_empty(&self) -> bool {
        !self.all && self.tables.is_empty()
    }

    /// The flush markers' contents (what `setup` emits).
    fn markers(&self) -> Vec<String> {
        if self.all {
            return vec!["flush:all".to_string()];
        }
        self.tables
            .iter()
            .map(|t| format!("flush:table:{t}"))
            .collect()
    }
}

/// What the watch remembers between readings: the publication's OID, and
/// what it may have hidden since the last flush.
#[derive(Debug, Default)]
struct Gaps {
    /// The OID last read (none before the first reading that found it).
    oid: Option<u32>,
    /// The publication was missing or recreated: every mapped table.
    all: bool,
    /// Tables hidden by a reading (publish actions, membership, ...).
    tables: BTreeSet<TableName>,
}

impl Gaps {
    /// Folds one reading in (`oid`: the publication's, `None` when it does
    /// not exist; `hidden`: the tables it hides now) and returns what to
    /// flush now that the publication publishes it again.
    fn reading(&mut self, oid: Option<u32>, hidden: &BTreeSet<TableName>) -> Due {
        let Some(oid) = oid else {
            self.all = true;
            return Due::default();
        };
        if self.oid.is_some_and(|o| o != oid) {
            self.all = true;
        }
        self.oid = Some(oid);
        if std::mem::take(&mut self.all) {
            // The tables still hidden need their own flush once repaired.
            self.tables.clone_from(hidden);
            return Due {
                all: true,
                tables: Vec::new(),
            };
        }
        self.tables.extend(hidden.iter().cloned());
        let repaired: Vec<TableName> = self.tables.difference(hidden).cloned().collect();
        for t in &repaired {
            self.tables.remove(t);
        }
        Due {
            all: false,
            tables: repaired,
        }
    }

    /// `due` could not be emitted: it is due again at the next reading.
    fn put_back(&mut self, due: Due) {
        self.all |= due.all;
        self.tables.extend(due.tables);
    }
}

/// Emits `due`'s flush markers (transactional, in one go each) and says so.
async fn emit(client: &SqlClient, publication: &str, due: &Due) -> Result<(), crate::pg::PgError> {
    let what = if due.all {
        "the publication was missing or dropped and recreated".to_string()
    } else {
        let names: Vec<String> = due.tables.iter().map(ToString::to_string).collect();
        format!("it hid the changes of {}", names.join(", "))
    };
    for marker in due.markers() {
        let lsn = client
            .emit_message(true, crate::plan::planner::MESSAGE_PREFIX, &marker)
            .await?;
        tracing::warn!(
            publication,
            { REASON } = %what,
            marker,
            lsn = %lsn,
            "publication repaired without `setup`: changes made meanwhile were never sent, so the worker emitted the flush marker setup would have"
        );
    }
    Ok(())
}

/// Reports a new reading: logged when the set of problems changed (then
/// again with a count while it lasts), counted when new problems appeared,
/// cleared when they are gone.
fn report(
    telemetry: &Telemetry,
    publication: &str,
    last: &[String],
    now: &[String],
    repeats: &mut Repeats,
) {
    if now.is_empty() {
        repeats.clear();
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
    let reason = now.join("; ");
    if let Some(count) = repeats.tick_for(&reason) {
        tracing::error!(
            publication,
            { REASON } = %reason,
            readings = count,
            "publication drift: changes of mapped tables are not sent, so their caches go stale; run `cache-invalidator setup`, which repairs the publication and flushes the tables whose changes were hidden"
        );
    }
    telemetry
        .metrics
        .set_publication_drift(Some(now.iter().any(|l| !last.contains(l))));
    telemetry.health.set_drift(Some(reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<TableName> {
        names.iter().map(|n| TableName::parse(n).unwrap()).collect()
    }

    #[test]
    fn a_table_hidden_then_published_again_is_flushed_once() {
        let mut g = Gaps::default();
        assert!(g.reading(Some(1), &set(&[])).is_empty());
        assert!(g.reading(Some(1), &set(&["a", "b"])).is_empty());
        assert_eq!(
            g.reading(Some(1), &set(&["b"])).markers(),
            ["flush:table:public.a"]
        );
        assert!(g.reading(Some(1), &set(&["b"])).is_empty());
        assert_eq!(
            g.reading(Some(1), &set(&[])).markers(),
            ["flush:table:public.b"]
        );
        assert!(g.reading(Some(1), &set(&[])).is_empty());
    }

    #[test]
    fn a_missing_or_recreated_publication_flushes_everything_once_back() {
        let mut g = Gaps::default();
        assert!(g.reading(Some(1), &set(&[])).is_empty());
        // Dropped: nothing to emit while it is missing.
        assert!(g.reading(None, &set(&["a"])).is_empty());
        assert_eq!(g.reading(Some(2), &set(&[])).markers(), ["flush:all"]);
        assert!(g.reading(Some(2), &set(&[])).is_empty());
        // Dropped and recreated between two readings: a new OID.
        assert_eq!(g.reading(Some(3), &set(&["a"])).markers(), ["flush:all"]);
        // Recreated without a; a is flushed on its own once added.
        assert_eq!(
            g.reading(Some(3), &set(&[])).markers(),
            ["flush:table:public.a"]
        );
    }

    #[test]
    fn what_could_not_be_emitted_is_due_again() {
        let mut g = Gaps::default();
        g.reading(Some(1), &set(&["a"]));
        let due = g.reading(Some(1), &set(&[]));
        g.put_back(due);
        assert_eq!(
            g.reading(Some(1), &set(&[])).markers(),
            ["flush:table:public.a"]
        );
        g.reading(None, &set(&[]));
        let due = g.reading(Some(2), &set(&[]));
        g.put_back(due);
        assert_eq!(g.reading(Some(2), &set(&[])).markers(), ["flush:all"]);
    }
}
