//! Read replicas (`[postgres] replicas = [...]`): a batch is applied once
//! every listed replica that is up has replayed past the commit record of
//! every transaction in it, because a reader of a replica that is behind
//! sees the old row and refills the cache with it.
//!
//! One task per replica holds a SQL connection and polls
//! `pg_last_wal_replay_lsn()`: idle every [`IDLE_POLL`] (for the lag
//! metrics), and with a short doubling delay while the sink stage wants a
//! position the replica has not replayed yet. The positions are published
//! on one `watch` channel; the sink stage decides with [`decide`] (pure) and
//! waits on that channel, so replicas are polled concurrently and a batch
//! whose position every replica already covers costs no query.
//!
//! Bounded: past `replica_max_wait_ms` the batch is applied anyway, counted
//! for that replica, and queued to be applied again once the replica
//! replays past it (what it served meanwhile is cleaned). A replica that
//! timed out is not waited for again until it caught up with the position
//! it timed out on. An unreachable replica serves no reader: it is marked
//! down (metric, `/readyz` detail without 503), reconnected in the
//! background and not waited for; what is applied meanwhile is queued for
//! it too (it serves readers while it catches up after coming back). See ARCHITECTURE.md (guarantee 9)
//! and docs/operations.md (read replicas).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::log_fields::{ERROR, LSN};
use crate::lsn::Lsn;
use crate::metrics::{Health, Metrics};
use crate::pg::{self, SqlClient};
use crate::plan::Plan;
use crate::repeats::Repeats;
use crate::source::ConnectionSettings;

/// How often a replica is polled when nothing waits for it (lag metrics).
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// First re-poll delay while a batch waits for a replica.
const POLL_FIRST: Duration = Duration::from_millis(1);
/// Longest re-poll delay while a batch waits for a replica.
const POLL_MAX: Duration = Duration::from_millis(50);
/// A replica query that takes longer than this marks the replica down.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Queued batches for one replica are merged into segments of about this
/// many operations (a segment is applied once the replica replayed its
/// last batch).
pub const REAPPLY_SEGMENT_OPS: usize = 10_000;
/// Segments queued per replica before they are collapsed into one flush of
/// every mapped table (about a million operations held at most).
pub const MAX_PENDING_REAPPLY: usize = 100;

/// What the worker knows about one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaState {
    /// `host:port` (or socket path): the metric label and log field.
    pub name: String,
    /// Connected, in recovery, answering.
    pub up: bool,
    /// Why it is down (`None` while up or before the first attempt).
    pub down_reason: Option<String>,
    /// `pg_last_wal_replay_lsn()` at the last poll.
    pub replay: Option<Lsn>,
    /// Seconds since the last replayed transaction when replay is behind
    /// what the replica received; 0 when it replayed everything received.
    pub lag_seconds: Option<f64>,
    /// Timed out at this position: not waited for until it replayed it.
    pub lagging_until: Option<Lsn>,
}

impl ReplicaState {
    fn new(name: String) -> Self {
        ReplicaState {
            name,
            up: false,
            down_reason: None,
            replay: None,
            lag_seconds: None,
            lagging_until: None,
        }
    }

    /// Whether it replayed `target` (the first byte after a commit record).
    pub fn covers(&self, target: Lsn) -> bool {
        self.replay.is_some_and(|r| r >= target)
    }

    /// Not polled yet (just started): neither up nor known to be down.
    fn untried(&self) -> bool {
        !self.up && self.down_reason.is_none()
    }

    /// Whether a batch at `target` must wait for this replica: it is up (or
    /// its first poll has not answered yet), not behind a timeout it has not
    /// recovered from, and not there yet.
    fn blocks(&self, target: Lsn) -> bool {
        (self.up || self.untried())
            && !self.covers(target)
            && self.lagging_until.is_none_or(|l| self.covers(l))
    }
}

/// What to do with a batch whose last commit record ends at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every replica that counts replayed it (or none counts).
    Apply,
    /// Some replicas have not replayed it yet; wait for a change.
    Wait(Vec<usize>),
    /// The deadline passed: apply now, re-apply for these replicas later.
    TimedOut(Vec<usize>),
}

/// The pure decision: replicas that are down, or behind a timeout they have
/// not recovered from, do not block; the others block until they replayed
/// `target`, or until `deadline`.
pub fn decide(states: &[ReplicaState], target: Lsn, now: Instant, deadline: Instant) -> Decision {
    let blocking: Vec<usize> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.blocks(target))
        .map(|(i, _)| i)
        .collect();
    if blocking.is_empty() {
        Decision::Apply
    } else if now >= deadline {
        Decision::TimedOut(blocking)
    } else {
        Decision::Wait(blocking)
    }
}

/// Replicas that did not replay a batch before it was applied: up ones
/// behind (timed out, or still lagging from an earlier timeout), and down
/// ones (when one comes back behind and serves readers while it catches up,
/// the batch must be applied again for it).
pub fn applied_ahead(states: &[ReplicaState], target: Lsn) -> Vec<usize> {
    states
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.covers(target))
        .map(|(i, _)| i)
        .collect()
}

/// A replica a batch is applied ahead of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    /// Its index in `[postgres] replicas`.
    pub replica: usize,
    /// Whether it was up then (counted as a timeout) or down (not counted).
    pub was_up: bool,
}

/// Applies a plan again (a clone of the sink, in the background).
pub type ReapplyFn = Arc<dyn Fn(Plan) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The replicas' positions and the batches waiting to be applied again.
pub struct Replicas {
    states: watch::Sender<Vec<ReplicaState>>,
    wanted: watch::Sender<Lsn>,
    max_wait: Duration,
    metrics: Option<Arc<Metrics>>,
    reappliers: Vec<tokio::sync::mpsc::UnboundedSender<(Lsn, Plan)>>,
    pending: Vec<Arc<std::sync::atomic::AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("states", &*self.states.borrow())
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// Where the pollers report and what they need.
#[derive(Clone)]
pub struct ReplicaContext {
    /// Per-replica metrics.
    pub metrics: Option<Arc<Metrics>>,
    /// `/readyz` detail for replicas that are down.
    pub health: Option<Arc<Health>>,
    /// The primary's WAL end as the stream last reported it (lag in bytes).
    pub primary_wal_end: Arc<dyn Fn() -> Lsn + Send + Sync>,
    /// Applies a plan again after a timed-out replica caught up.
    pub reapply: ReapplyFn,
    /// Every mapped table's truncate invalidations: what replaces the queue
    /// of a replica past [`MAX_PENDING_REAPPLY`] batches.
    pub flush_plan: Plan,
}

impl Replicas {
    /// Starts one poller and one re-applier per replica. Dropping the
    /// returned value stops them.
    pub fn spawn(
        replicas: Vec<ConnectionSettings>,
        max_wait: Duration,
        ctx: ReplicaContext,
    ) -> Self {
        let initial: Vec<ReplicaState> = replicas
            .iter()
            .map(|s| ReplicaState::new(s.target()))
            .collect();
        let (states, _) = watch::channel(initial);
        let (wanted, _) = watch::channel(Lsn::ZERO);
        let mut tasks = Vec::new();
        let mut reappliers = Vec::new();
        let mut pending = Vec::new();
        for (i, settings) in replicas.into_iter().enumerate() {
            if let Some(m) = &ctx.metrics {
                m.replica_up(&settings.target(), false);
            }
            tasks.push(tokio::spawn(poll_replica(
                i,
                settings,
                states.clone(),
                wanted.subscribe(),
                ctx.clone(),
            )));
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            tasks.push(tokio::spawn(reapply_task(
                i,
                rx,
                states.subscribe(),
                Arc::clone(&count),
                ctx.clone(),
            )));
            reappliers.push(tx);
            pending.push(count);
        }
        Replicas {
            states,
            wanted,
            max_wait,
            metrics: ctx.metrics,
            reappliers,
            pending,
            tasks,
        }
    }

    /// The replicas' current states (for `status`, tests, `/readyz`).
    pub fn states(&self) -> Vec<ReplicaState> {
        self.states.borrow().clone()
    }

    /// Waits until every replica that counts replayed `target` (the first
    /// byte after the batch's last commit record), at most `max_wait`.
    /// Returns the replicas the batch will be applied ahead of; the caller
    /// applies it and then hands it to [`Replicas::reapply_later`].
    pub async fn wait_replayed(&self, target: Lsn) -> Vec<Ahead> {
        if target == Lsn::ZERO || self.reappliers.is_empty() {
            return Vec::new();
        }
        let mut rx = self.states.subscribe();
        let started = Instant::now();
        let deadline = started + self.max_wait;
        let mut waited_for: Vec<usize> = Vec::new();
        loop {
            let decision = decide(&rx.borrow_and_update(), target, Instant::now(), deadline);
            match decision {
                Decision::Apply => break,
                Decision::Wait(blocking) => {
                    for i in blocking {
                        if !waited_for.contains(&i) {
                            waited_for.push(i);
                        }
                    }
                    self.wanted.send_if_modified(|w| {
                        let raise = *w < target;
                        if raise {
                            *w = target;
                        }
                        raise
                    });
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { break },
                        () = tokio::time::sleep_until(deadline.into()) => {}
                    }
                }
                Decision::TimedOut(late) => {
                    self.states.send_modify(|states| {
                        for &i in &late {
                            let s = &mut states[i];
                            s.lagging_until =
                                Some(s.lagging_until.map_or(target, |l| l.max(target)));
                            tracing::warn!(
                                replica = %s.name,
                                { LSN } = %target,
                                replay = %s.replay.unwrap_or(Lsn::ZERO),
                                max_wait_ms = self.max_wait.as_millis() as u64,
                                "read replica did not replay the batch within replica_max_wait_ms: \
                                 applying it now and again once the replica caught up"
                            );
                        }
                    });
                    break;
                }
            }
        }
        if let Some(m) = &self.metrics {
            let states = self.states.borrow();
            for &i in &waited_for {
                m.replica_wait(&states[i].name);
            }
        }
        let ahead: Vec<Ahead> = {
            let states = self.states.borrow();
            applied_ahead(&states, target)
                .into_iter()
                .map(|i| Ahead {
                    replica: i,
                    was_up: states[i].up,
                })
                .collect()
        };
        // A down replica that comes back behind is not waited for until it
        // replayed what was applied while it was down (it is re-applied then).
        self.states.send_if_modified(|states| {
            let mut changed = false;
            for a in &ahead {
                let s = &mut states[a.replica];
                if !a.was_up && s.lagging_until.is_none_or(|l| l < target) {
                    s.lagging_until = Some(target);
                    changed = true;
                }
            }
            changed
        });
        ahead
    }

    /// Queues `plan` (applied at `target`) to be applied again for each of
    /// `replicas` once it replayed `target`; counted as a timeout for the
    /// replicas that are up (a down one serves no reader meanwhile).
    pub fn reapply_later(&self, replicas: &[Ahead], target: Lsn, plan: &Plan) {
        for &Ahead { replica: i, was_up } in replicas {
            if let Some(m) = &self.metrics {
                if was_up {
                    m.replica_timeout(&self.states.borrow()[i].name);
                }
            }
            self.pending[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = self.reappliers[i].send((target, plan.clone()));
        }
    }

    /// Whether there are replicas at all.
    pub fn is_empty(&self) -> bool {
        self.reappliers.is_empty()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What one poll of a replica returns.
struct Poll {
    in_recovery: bool,
    replay: Option<Lsn>,
    lag_seconds: Option<f64>,
}

async fn poll_once(client: &SqlClient) -> Result<Poll, String> {
    let query = client.client().query_one(
        "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
         CASE WHEN pg_last_wal_receive_lsn() IS NULL \
                OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn() THEN 0::float8 \
              ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END",
        &[],
    );
    let row = match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => return Err(format!("{}: pg_last_wal_replay_lsn(): {e}", client.url())),
        Err(_) => {
            return Err(format!(
                "{}: pg_last_wal_replay_lsn() did not answer in {QUERY_TIMEOUT:?}",
                client.url()
            ))
        }
    };
    let in_recovery: bool = row.try_get(0).map_err(|e| e.to_string())?;
    let replay: Option<String> = row.try_get(1).map_err(|e| e.to_string())?;
    let lag_seconds: Option<f64> = row.try_get(2).map_err(|e| e.to_string())?;
    Ok(Poll {
        in_recovery,
        replay: replay.and_then(|s| s.parse().ok()),
        lag_seconds,
    })
}

/// Marks replica `i` down: logged when the reason is new, then with a count
/// while it stays down ([`Repeats`]).
fn mark_down(
    i: usize,
    why: String,
    states: &watch::Sender<Vec<ReplicaState>>,
    ctx: &ReplicaContext,
    repeats: &mut Repeats,
) {
    let mut name = String::new();
    let changed = states.send_if_modified(|s| {
        let s = &mut s[i];
        name = s.name.clone();
        let changed = s.up || s.down_reason.as_deref() != Some(&why);
        s.up = false;
        s.down_reason = Some(why.clone());
        changed
    });
    if let Some(count) = repeats.tick_for(&why) {
        tracing::warn!(
            replica = %name,
            { ERROR } = %why,
            attempts = count,
            "read replica down: not waited for (it serves no reader while unreachable); reconnecting in the background"
        );
    }
    if changed {
        if let Some(m) = &ctx.metrics {
            m.replica_up(&name, false);
        }
        if let Some(h) = &ctx.health {
            h.set_replica_down(&name, Some(why));
        }
    }
}

async fn poll_replica(
    i: usize,
    settings: ConnectionSettings,
    states: watch::Sender<Vec<ReplicaState>>,
    mut wanted: watch::Receiver<Lsn>,
    ctx: ReplicaContext,
) {
    let name = settings.target();
    let mut reconnect = crate::retry::Backoff::new();
    let mut downs = Repeats::default();
    loop {
        let client = match pg::connect(&settings).await {
            Ok(c) => c,
            Err(err) => {
                mark_down(i, err.to_string(), &states, &ctx, &mut downs);
                tokio::time::sleep(reconnect.next_delay()).await;
                continue;
            }
        };
        let mut delay = POLL_FIRST;
        loop {
            let poll = match poll_once(&client).await {
                Ok(p) => p,
                Err(why) => {
                    mark_down(i, why, &states, &ctx, &mut downs);
                    break;
                }
            };
            if !poll.in_recovery {
                mark_down(
                    i,
                    format!(
                        "{}: not a standby (pg_is_in_recovery() is false: promoted?)",
                        client.url()
                    ),
                    &states,
                    &ctx,
                    &mut downs,
                );
                break;
            }
            reconnect = crate::retry::Backoff::new();
            let mut came_up = false;
            states.send_if_modified(|s| {
                let s = &mut s[i];
                came_up = !s.up;
                let changed = came_up || s.replay != poll.replay;
                s.up = true;
                s.down_reason = None;
                s.replay = poll.replay;
                s.lag_seconds = poll.lag_seconds;
                if s.lagging_until.is_some_and(|l| s.covers(l)) {
                    s.lagging_until = None;
                }
                changed
            });
            if came_up {
                downs.clear();
                tracing::info!(replica = %name, replay = %poll.replay.unwrap_or(Lsn::ZERO), "read replica up");
                if let Some(h) = &ctx.health {
                    h.set_replica_down(&name, None);
                }
            }
            if let Some(m) = &ctx.metrics {
                m.replica_up(&name, true);
                let end = (ctx.primary_wal_end)();
                let replay = poll.replay.unwrap_or(Lsn::ZERO);
                m.replica_lag(
                    &name,
                    end.0.saturating_sub(replay.0),
                    poll.lag_seconds.unwrap_or(0.0),
                );
            }
            let want = *wanted.borrow_and_update();
            if poll.replay.is_none_or(|r| r < want) {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(POLL_MAX);
                continue;
            }
            delay = POLL_FIRST;
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
        tokio::time::sleep(reconnect.next_delay()).await;
    }
}

/// Appends a batch to the queue, merged into the last segment while that
/// one holds fewer than [`REAPPLY_SEGMENT_OPS`] operations (the segment is
/// then applied once the replica replayed the later batch).
fn push_merged(held: &mut VecDeque<(Lsn, Plan)>, (target, plan): (Lsn, Plan)) {
    match held.back_mut() {
        Some((at, last)) if last.ops() < REAPPLY_SEGMENT_OPS => {
            *at = (*at).max(target);
            last.merge(plan);
        }
        _ => held.push_back((target, plan)),
    }
}

/// Applies the batches a replica was behind on, in order, once it replayed
/// each one's position; retries a failed application with backoff.
async fn reapply_task(
    i: usize,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<(Lsn, Plan)>,
    mut states: watch::Receiver<Vec<ReplicaState>>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
    ctx: ReplicaContext,
) {
    let mut held: VecDeque<(Lsn, Plan)> = VecDeque::new();
    loop {
        // Take everything queued, merged into segments; collapse a queue
        // that grew too long.
        while let Ok(item) = queue.try_recv() {
            push_merged(&mut held, item);
        }
        if held.len() > MAX_PENDING_REAPPLY {
            let target = held.iter().map(|(l, _)| *l).max().unwrap_or(Lsn::ZERO);
            tracing::warn!(
                replica = %states.borrow()[i].name,
                batches = held.len(),
                "more batches wait for a lagging read replica than are kept: they will be replaced by one flush of every mapped table once it caught up"
            );
            held.clear();
            held.push_back((target, ctx.flush_plan.clone()));
        }
        let Some((target, _)) = held.front() else {
            match queue.recv().await {
                Some(item) => push_merged(&mut held, item),
                None => return,
            }
            continue;
        };
        let target = *target;
        let caught_up = states.borrow_and_update()[i].covers(target);
        if !caught_up {
            tokio::select! {
                changed = states.changed() => if changed.is_err() { return },
                item = queue.recv() => match item {
                    Some(item) => push_merged(&mut held, item),
                    None => return,
                },
            }
            continue;
        }
        let Some((_, plan)) = held.pop_front() else {
            continue;
        };
        let name = states.borrow()[i].name.clone();
        let mut backoff = crate::retry::Backoff::new();
        let mut failures = Repeats::default();
        loop {
            match (ctx.reapply)(plan.clone()).await {
                Ok(()) => break,
                Err(err) => {
                    if let Some(count) = failures.tick_for(&err.to_string()) {
                        tracing::warn!(replica = %name, { ERROR } = %err, attempts = count, "re-applying a batch after the read replica caught up failed; retrying");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = &ctx.metrics {
            m.replica_reapplied(&name);
        }
        tracing::info!(replica = %name, { LSN } = %target, "read replica caught up: applied the batch it was behind on again");
    }
}

#[cfg(test)]
mod tests;
