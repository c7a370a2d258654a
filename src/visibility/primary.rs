//! Primary visibility: a transaction in the WAL stream is committed, but not
//! necessarily visible yet. A commit waiting for a synchronous standby
//! (`synchronous_commit = on` with `synchronous_standby_names`) has its commit
//! record flushed, and its backend still sits in the proc array: every new
//! snapshot lists it as running, so readers see the old row. Invalidating
//! then lets a reader refill the cache with that old row.
//!
//! The check is one query per batch, `SELECT pg_current_snapshot()`, parsed
//! here into `xmin:xmax:xip`; the 32-bit xids of the batch (from the Begin
//! messages) are widened to 64 bits against the snapshot's `xmax`. A committed
//! transaction is visible to a snapshot when its xid is below `xmin`, or below
//! `xmax` and not in `xip`. Once visible to one snapshot it is visible to every
//! later one, so the last snapshot is kept and a batch whose xids it already
//! covers needs no query at all. See ARCHITECTURE.md (guarantee 9) and
//! docs/operations.md (synchronous replication).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::log_fields::{ELAPSED_MS, ERROR, XID};
use crate::metrics::{Health, Metrics};
use crate::pg::{self, PgError, SqlClient};
use crate::repeats::Repeats;
use crate::source::{ConnectionSettings, RetryClass};

/// First re-poll delay while a transaction is not visible yet.
const POLL_FIRST: Duration = Duration::from_millis(1);
/// Longest re-poll delay while a transaction is not visible yet.
const POLL_MAX: Duration = Duration::from_millis(50);
/// A wait longer than this is logged once, naming the transaction.
pub const SLOW_WAIT: Duration = Duration::from_secs(1);
/// A snapshot query that takes longer than this drops the connection.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `pg_snapshot` (`xmin:xmax:xip_list`), with full 64-bit transaction ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every transaction below this one is finished.
    pub xmin: u64,
    /// Every transaction at or above this one had not started.
    pub xmax: u64,
    /// Transactions in `[xmin, xmax)` still running when the snapshot was taken.
    pub xip: Vec<u64>,
}

/// Text that is not a `pg_snapshot`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pg_current_snapshot() returned {text:?}, not xmin:xmax:xip_list: {reason}")]
pub struct SnapshotParseError {
    /// What the server returned.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Snapshot {
    /// Parses PostgreSQL's text form, e.g. `10:20:10,14,15` or `748:748:`.
    pub fn parse(text: &str) -> Result<Snapshot, SnapshotParseError> {
        let err = |reason| SnapshotParseError {
            text: text.to_owned(),
            reason,
        };
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next().ok_or_else(|| err("no xmin"))?;
        let xmax = parts.next().ok_or_else(|| err("no xmax"))?;
        let xip = parts.next().ok_or_else(|| err("no xip list"))?;
        let xmin: u64 = xmin.parse().map_err(|_| err("xmin is not a number"))?;
        let xmax: u64 = xmax.parse().map_err(|_| err("xmax is not a number"))?;
        if xmin > xmax {
            return Err(err("xmin above xmax"));
        }
        let mut list = Vec::new();
        for x in xip.split(',').filter(|s| !s.is_empty()) {
            let x: u64 = x.parse().map_err(|_| err("an xip entry is not a number"))?;
            if x < xmin || x >= xmax {
                return Err(err("an xip entry outside [xmin, xmax)"));
            }
            list.push(x);
        }
        list.sort_unstable();
        Ok(Snapshot {
            xmin,
            xmax,
            xip: list,
        })
    }

    /// Whether the committed transaction `xid` (32 bits, as the Begin message
    /// carries it) is visible to this snapshot. Special xids (0: invalid, 1:
    /// bootstrap, 2: frozen) are always visible.
    pub fn shows_committed(&self, xid: u32) -> bool {
        if xid < 3 {
            return true;
        }
        let full = widen(xid, self.xmax);
        full < self.xmin || (full < self.xmax && self.xip.binary_search(&full).is_err())
    }
}

/// The 64-bit transaction id of the 32-bit `xid` nearest to `reference`
/// (a snapshot's `xmax`): the epoch is taken from `reference` and adjusted
/// when the two straddle a wraparound of the 32-bit counter.
pub fn widen(xid: u32, reference: u64) -> u64 {
    // Truncation intended: the low 32 bits are the 32-bit xid of `reference`.
    let low = reference as u32;
    let diff = low.wrapping_sub(xid) as i32;
    reference.wrapping_sub(i64::from(diff) as u64)
}

/// Waits until the transactions of a batch are visible on the primary, over
/// its own SQL connection (opened on first use, reopened after an error).
pub struct PrimaryVisibility {
    settings: ConnectionSettings,
    client: Option<SqlClient>,
    known: Option<Snapshot>,
    metrics: Option<Arc<Metrics>>,
    health: Option<Arc<Health>>,
}

impl std::fmt::Debug for PrimaryVisibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryVisibility")
            .field("target", &self.settings.target())
            .field("known", &self.known)
            .finish_non_exhaustive()
    }
}

/// How one batch's visibility check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checked {
    /// Snapshots queried (0: the last snapshot already showed every xid).
    pub queries: u32,
    /// Time from the first query to visible.
    pub waited: Duration,
}

impl PrimaryVisibility {
    /// A checker for the primary at `settings` (the `[postgres] url`);
    /// `metrics` and `health` receive the wait histogram, the waiting gauge
    /// and a `/readyz` reason while the check cannot run.
    pub fn new(
        settings: ConnectionSettings,
        metrics: Option<Arc<Metrics>>,
        health: Option<Arc<Health>>,
    ) -> Self {
        PrimaryVisibility {
            settings,
            client: None,
            known: None,
            metrics,
            health,
        }
    }

    /// Whether the last snapshot seen already shows every one of `xids`.
    pub fn known_visible(&self, xids: &[u32]) -> bool {
        match &self.known {
            Some(s) => xids.iter().all(|x| s.shows_committed(*x)),
            None => xids.is_empty(),
        }
    }

    /// Returns once every transaction of `xids` (committed: they come from
    /// the stream) is visible to new snapshots on the primary. Waiting is
    /// correct however long it takes: until then readers see the old rows.
    /// Errors (connection lost, server restarting) are retried with backoff,
    /// never answered by applying unchecked.
    pub async fn wait_visible(&mut self, xids: &[u32]) -> Checked {
        if self.known_visible(xids) {
            return Checked::default();
        }
        let started = Instant::now();
        let mut checked = Checked::default();
        let mut delay = POLL_FIRST;
        let mut reconnect = crate::retry::Backoff::new();
        let mut logged_slow = false;
        let mut failures = Repeats::default();
        if let Some(m) = &self.metrics {
            m.set_visibility_waiting(true);
        }
        loop {
            checked.queries += 1;
            match self.snapshot().await {
                Ok(snapshot) => {
                    let pending = xids.iter().find(|x| !snapshot.shows_committed(**x));
                    let first_pending = pending.copied();
                    self.known = Some(snapshot);
                    if failures.clear() {
                        if let Some(h) = &self.health {
                            h.set_visibility_blocked(None);
                        }
                    }
                    let Some(xid) = first_pending else { break };
                    if !logged_slow && started.elapsed() >= SLOW_WAIT {
                        logged_slow = true;
                        tracing::warn!(
                            { XID } = xid,
                            { ELAPSED_MS } = started.elapsed().as_millis() as u64,
                            "transaction committed in the WAL but not visible on the primary yet: \
                             its backend is most likely waiting for a synchronous standby \
                             (synchronous_commit, synchronous_standby_names); invalidation waits \
                             until readers can see the new row"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(POLL_MAX);
                }
                Err(err) => {
                    self.client = None;
                    let why = err.to_string();
                    if let Some(count) = failures.tick_for(&why) {
                        tracing::warn!(
                            { ERROR } = %why,
                            attempts = count,
                            "visibility check: cannot read pg_current_snapshot() on the primary; \
                             retrying (no batch is applied before its transactions are visible)"
                        );
                        if let Some(h) = &self.health {
                            h.set_visibility_blocked(Some(why.clone()));
                        }
                    }
                    let wait = reconnect.next_delay();
                    if err.retry_class() == RetryClass::Fatal {
                        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
                    } else {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        checked.waited = started.elapsed();
        if let Some(m) = &self.metrics {
            m.set_visibility_waiting(false);
            m.visibility_wait(checked.waited);
        }
        if logged_slow {
            tracing::info!(
                { ELAPSED_MS } = checked.waited.as_millis() as u64,
                "the transactions waited for are visible on the primary now"
            );
        }
        checked
    }

    /// One `pg_current_snapshot()`, connecting first if needed; the
    /// connection is kept only when the query succeeded.
    async fn snapshot(&mut self) -> Result<Snapshot, PgError> {
        let client = match self.client.take() {
            Some(client) => client,
            None => pg::connect(&self.settings).await?,
        };
        let snapshot = query_snapshot(&client).await?;
        self.client = Some(client);
        Ok(snapshot)
    }
}

/// `SELECT pg_current_snapshot()`, parsed, under [`QUERY_TIMEOUT`].
async fn query_snapshot(client: &SqlClient) -> Result<Snapshot, PgError> {
    const DURING: &str = "SELECT pg_current_snapshot() (visibility check)";
    let answer = |reason: String| PgError::Answer {
        what: DURING.into(),
        url: client.url().to_owned(),
        reason,
    };
    let query = client
        .client()
        .query_one("SELECT pg_current_snapshot()::text", &[]);
    let row = match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(result) => result.map_err(|e| client.err(DURING, e))?,
        Err(_) => return Err(answer(format!("no answer in {QUERY_TIMEOUT:?}"))),
    };
    let text: String = row.try_get(0).map_err(|e| client.err(DURING, e))?;
    Snapshot::parse(&text).map_err(|e| answer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshots() {
        assert_eq!(
            Snapshot::parse("748:748:").unwrap(),
            Snapshot {
                xmin: 748,
                xmax: 748,
                xip: vec![]
            }
        );
        assert_eq!(
            Snapshot::parse("10:20:15,10,14").unwrap(),
            Snapshot {
                xmin: 10,
                xmax: 20,
                xip: vec![10, 14, 15]
            }
        );
        let big = Snapshot::parse("8589934600:8589934610:8589934605\n").unwrap();
        assert_eq!(big.xip, vec![8_589_934_605]);
        for bad in [
            "", "10", "10:20", "x:20:", "10:y:", "20:10:", "10:20:9", "10:20:20", "10:20:1a",
        ] {
            assert!(Snapshot::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn widens_within_an_epoch_and_across_wraparound() {
        // Same epoch.
        assert_eq!(widen(100, 150), 100);
        assert_eq!(widen(150, 150), 150);
        // Epoch 2: xmax = 2 << 32 | 5.
        let epoch2 = (2u64 << 32) | 5;
        assert_eq!(widen(3, epoch2), (2u64 << 32) | 3);
        // The xid is from the end of epoch 1, xmax just wrapped into epoch 2.
        assert_eq!(
            widen(u32::MAX - 10, epoch2),
            (1u64 << 32) | u64::from(u32::MAX - 10)
        );
        // An xid just above xmax (not started when the snapshot was taken).
        assert_eq!(widen(7, epoch2), (2u64 << 32) | 7);
        // xmax at the end of an epoch, the xid just wrapped into the next one.
        let end1 = (1u64 << 32) | u64::from(u32::MAX - 1);
        assert_eq!(widen(4, end1), (2u64 << 32) | 4);
    }

    #[test]
    fn visibility_follows_xmin_xmax_and_xip() {
        let s = Snapshot::parse("100:110:100,105").unwrap();
        assert!(s.shows_committed(99), "below xmin");
        assert!(!s.shows_committed(100), "running");
        assert!(s.shows_committed(101), "finished inside the window");
        assert!(
            !s.shows_committed(105),
            "running (waiting for a synchronous standby)"
        );
        assert!(
            !s.shows_committed(110),
            "at xmax: not started for this snapshot"
        );
        assert!(!s.shows_committed(200), "after xmax");
        assert!(s.shows_committed(0) && s.shows_committed(2), "special xids");
    }

    #[test]
    fn visibility_across_an_epoch_boundary() {
        // xmax in epoch 3 at 20; an xid of the previous epoch still running.
        let running = (2u64 << 32) | u64::from(u32::MAX - 1);
        let s = Snapshot {
            xmin: running,
            xmax: (3u64 << 32) | 20,
            xip: vec![running],
        };
        assert!(
            !s.shows_committed(u32::MAX - 1),
            "running, from the previous epoch"
        );
        assert!(s.shows_committed(u32::MAX), "finished, previous epoch");
        assert!(s.shows_committed(19), "finished, this epoch");
        assert!(!s.shows_committed(20), "not started");
    }

    #[test]
    fn known_snapshot_skips_the_query() {
        let settings = ConnectionSettings::parse("postgres://u@127.0.0.1:1/db", None).unwrap();
        let mut v = PrimaryVisibility::new(settings, None, None);
        assert!(v.known_visible(&[]), "an empty batch needs no check");
        assert!(!v.known_visible(&[5]), "no snapshot yet: query");
        v.known = Some(Snapshot::parse("10:20:12").unwrap());
        assert!(v.known_visible(&[3, 9, 11, 19]));
        assert!(!v.known_visible(&[11, 12]), "12 was running");
        assert!(!v.known_visible(&[25]), "newer than the snapshot");
    }
}
