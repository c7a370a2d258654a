//! [`Health`]: readiness and liveness, set by the worker and read by the
//! endpoint's `/readyz` and `/livez`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{lock, Role};

/// How long the run loop may go without [`Health::touch`] before `/livez` fails.
pub const LIVENESS_STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct HealthState {
    /// `Err(why)` while not streaming.
    streaming: Result<(), String>,
    /// `Err(why)` while Redis is unreachable.
    redis: Result<(), String>,
    blocked: Option<String>,
    role: Option<Role>,
    renamed: Option<String>,
    broken: Option<String>,
    drift: Option<String>,
    missing_columns: Option<String>,
    heartbeat_lag: Option<Duration>,
    /// Why the visibility check on the primary cannot run (503).
    visibility: Option<String>,
    /// Read replicas that are down, and why (detail only: 200 stays 200).
    replicas_down: std::collections::BTreeMap<String, String>,
}

/// Readiness and liveness, shared between the worker (which sets it) and the
/// HTTP endpoint (which reads it). Starts "not streaming: starting" and
/// "redis unreachable: not connected yet".
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    started: Instant,
    /// Milliseconds since `started` of the last loop tick.
    last_tick_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(HealthState {
                streaming: Err("starting".into()),
                redis: Err("not connected yet".into()),
                blocked: None,
                role: None,
                renamed: None,
                broken: None,
                drift: None,
                missing_columns: None,
                heartbeat_lag: None,
                visibility: None,
                replicas_down: std::collections::BTreeMap::new(),
            }),
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// A fresh state, shared.
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    /// The run loop is alive: call on every iteration (or at least every few
    /// seconds, standby included). Cheap: one atomic store.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Streaming the slot.
    pub fn set_streaming(&self) {
        lock(&self.state).streaming = Ok(());
    }

    /// Not streaming, and why (`connecting to 10.0.0.5:5432`, `connection lost: ...`).
    pub fn set_not_streaming(&self, why: impl Into<String>) {
        lock(&self.state).streaming = Err(why.into());
    }

    /// Redis answered.
    pub fn set_redis_reachable(&self) {
        lock(&self.state).redis = Ok(());
    }

    /// Redis did not answer, and why.
    pub fn set_redis_unreachable(&self, why: impl Into<String>) {
        lock(&self.state).redis = Err(why.into());
    }

    /// Acknowledgement blocked by a permanent Redis error (`Some("NOPERM ...")`), or no longer.
    pub fn set_blocked(&self, reason: Option<String>) {
        lock(&self.state).blocked = reason;
    }

    /// This worker's role.
    pub fn set_role(&self, role: Role) {
        lock(&self.state).role = Some(role);
    }

    /// Mapped tables followed under a new name (`Some("public.users -> public.people")`), or none.
    pub fn set_renamed(&self, reason: Option<String>) {
        lock(&self.state).renamed = reason;
    }

    /// Mapped tables DDL broke, invalidated by fallback (`Some("public.posts: ...")`), or none.
    pub fn set_broken(&self, reason: Option<String>) {
        lock(&self.state).broken = reason;
    }

    /// What the publication hides from the mappings, or `None` when nothing.
    pub fn set_drift(&self, reason: Option<String>) {
        lock(&self.state).drift = reason;
    }

    /// Mapped placeholder columns their table no longer has
    /// (`Some("public.posts.author_id")`), or none.
    pub fn set_missing_columns(&self, reason: Option<String>) {
        lock(&self.state).missing_columns = reason;
    }

    /// How long the last heartbeat took to come back through the stream.
    pub fn set_heartbeat_lag(&self, lag: Duration) {
        lock(&self.state).heartbeat_lag = Some(lag);
    }

    /// The visibility check on the primary cannot run (`Some(why)`: batches
    /// wait, 503), or runs again (`None`).
    pub fn set_visibility_blocked(&self, why: Option<String>) {
        lock(&self.state).visibility = why;
    }

    /// A read replica is down (`Some(why)`) or up again (`None`). Shown in
    /// `/readyz` without failing it: a down replica serves no reader.
    pub fn set_replica_down(&self, replica: &str, why: Option<String>) {
        let mut s = lock(&self.state);
        match why {
            Some(why) => s.replicas_down.insert(replica.to_owned(), why),
            None => s.replicas_down.remove(replica),
        };
    }

    /// The last heartbeat lag, if a heartbeat came back yet.
    pub fn heartbeat_lag(&self) -> Option<Duration> {
        lock(&self.state).heartbeat_lag
    }

    /// `(200, "ok")` while streaming with Redis reachable, nothing blocked, no
    /// renamed or broken table, no missing mapped column and no publication
    /// drift; otherwise 503 and one
    /// reason per line.
    pub fn readyz(&self) -> (u16, String) {
        let s = lock(&self.state);
        let mut reasons: Vec<String> = Vec::new();
        if s.role == Some(Role::Standby) {
            reasons.push("standby".into());
        } else if let Err(why) = &s.streaming {
            reasons.push(format!("not streaming: {why}"));
        }
        if let Err(why) = &s.redis {
            reasons.push(format!("redis unreachable: {why}"));
        }
        if let Some(b) = &s.blocked {
            reasons.push(format!("blocked: {b}"));
        }
        if let Some(r) = &s.renamed {
            reasons.push(format!("renamed table {r}"));
        }
        if let Some(m) = &s.missing_columns {
            reasons.push(format!(
                "mapped column missing {m}: those tables fall back to their truncate invalidations; fix the mappings"
            ));
        }
        if let Some(v) = &s.visibility {
            reasons.push(format!("visibility check failing: {v}"));
        }
        let details: Vec<String> = s
            .replicas_down
            .iter()
            .map(|(name, why)| format!("replica {name} down (not waited for): {why}"))
            .collect();
        if let Some(d) = &s.drift {
            reasons.push(format!("publication drift: {d}"));
        }
        if let Some(b) = &s.broken {
            reasons.push(format!("broken mapping (fallback): {b}"));
        }
        if reasons.is_empty() {
            let mut body = String::from("ok");
            for d in details {
                body.push('\n');
                body.push_str(&d);
            }
            (200, body)
        } else {
            reasons.extend(details);
            (503, reasons.join("\n"))
        }
    }

    /// 200 while the run loop touched the state within [`LIVENESS_STALE_AFTER`], 503 otherwise.
    pub fn livez(&self) -> (u16, String) {
        self.livez_at(Instant::now())
    }

    fn livez_at(&self, now: Instant) -> (u16, String) {
        let last = self.started + Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        let idle = now.saturating_duration_since(last);
        if idle > LIVENESS_STALE_AFTER {
            (
                503,
                format!("run loop stalled: last tick {} s ago", idle.as_secs()),
            )
        } else {
            (200, "ok".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Arc<Health> {
        let h = Health::new();
        h.set_role(Role::Active);
        h.set_streaming();
        h.set_redis_reachable();
        h
    }

    #[test]
    fn readyz_ok_only_when_streaming_reachable_and_unblocked() {
        assert_eq!(ready().readyz(), (200, "ok".to_string()));
    }

    #[test]
    fn readyz_names_a_down_replica_without_failing() {
        let h = ready();
        h.set_replica_down("10.0.0.2:5432", Some("connection refused".into()));
        assert_eq!(
            h.readyz(),
            (
                200,
                "ok\nreplica 10.0.0.2:5432 down (not waited for): connection refused".to_string()
            )
        );
        h.set_replica_down("10.0.0.2:5432", None);
        assert_eq!(h.readyz(), (200, "ok".to_string()));
    }

    #[test]
    fn readyz_fails_while_the_visibility_check_cannot_run() {
        let h = ready();
        h.set_visibility_blocked(Some("connection refused".into()));
        assert_eq!(
            h.readyz(),
            (
                503,
                "visibility check failing: connection refused".to_string()
            )
        );
        h.set_visibility_blocked(None);
        assert_eq!(h.readyz().0, 200);
    }

    #[test]
    fn readyz_fresh_state_is_not_ready() {
        let h = Health::new();
        assert_eq!(
            h.readyz(),
            (
                503,
                "not streaming: starting\nredis unreachable: not connected yet".to_string()
            )
        );
    }

    #[test]
    fn readyz_standby() {
        let h = ready();
        h.set_role(Role::Standby);
        h.set_not_streaming("slot cache_invalidator is active for PID 4242");
        assert_eq!(h.readyz(), (503, "standby".to_string()));
    }

    #[test]
    fn readyz_not_streaming() {
        let h = ready();
        h.set_not_streaming("connection lost: server closed the connection");
        assert_eq!(
            h.readyz(),
            (
                503,
                "not streaming: connection lost: server closed the connection".to_string()
            )
        );
        h.set_streaming();
        assert_eq!(h.readyz().0, 200);
    }

    #[test]
    fn readyz_redis_unreachable() {
        let h = ready();
        h.set_redis_unreachable("connection refused (127.0.0.1:6379)");
        assert_eq!(
            h.readyz(),
            (
                503,
                "redis unreachable: connection refused (127.0.0.1:6379)".to_string()
            )
        );
        h.set_redis_reachable();
        assert_eq!(h.readyz().0, 200);
    }

    #[test]
    fn readyz_blocked() {
        let h = ready();
        h.set_blocked(Some(
            "NOPERM this user has no permissions to run the 'unlink' command".into(),
        ));
        assert_eq!(
            h.readyz(),
            (
                503,
                "blocked: NOPERM this user has no permissions to run the 'unlink' command"
                    .to_string()
            )
        );
        h.set_blocked(None);
        assert_eq!(h.readyz().0, 200);
    }

    #[test]
    fn readyz_renamed_table() {
        let h = ready();
        h.set_renamed(Some("public.users -> public.people".into()));
        assert_eq!(
            h.readyz(),
            (
                503,
                "renamed table public.users -> public.people".to_string()
            )
        );
        h.set_renamed(None);
        assert_eq!(h.readyz().0, 200);
    }

    #[test]
    fn readyz_lists_every_reason() {
        let h = ready();
        h.set_not_streaming("connecting");
        h.set_redis_unreachable("timeout");
        h.set_blocked(Some("OOM command not allowed".into()));
        h.set_renamed(Some("public.a -> public.b".into()));
        assert_eq!(
            h.readyz(),
            (
                503,
                "not streaming: connecting\nredis unreachable: timeout\nblocked: OOM command not allowed\nrenamed table public.a -> public.b"
                    .to_string()
            )
        );
    }

    #[test]
    fn heartbeat_lag_is_kept_and_does_not_affect_readiness() {
        let h = ready();
        assert_eq!(h.heartbeat_lag(), None);
        h.set_heartbeat_lag(Duration::from_millis(30));
        assert_eq!(h.heartbeat_lag(), Some(Duration::from_millis(30)));
        assert_eq!(h.readyz().0, 200);
    }

    #[test]
    fn livez_ok_while_touched_and_503_when_stale() {
        let h = Health::new();
        assert_eq!(h.livez(), (200, "ok".to_string()));
        let later = Instant::now() + LIVENESS_STALE_AFTER + Duration::from_secs(5);
        let (code, body) = h.livez_at(later);
        assert_eq!(code, 503);
        assert!(body.starts_with("run loop stalled: last tick "), "{body}");
        // A standby touching its loop is alive.
        h.set_role(Role::Standby);
        h.touch();
        assert_eq!(h.livez_at(Instant::now() + Duration::from_secs(30)).0, 200);
    }
}
