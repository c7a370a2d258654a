//! Guarantee 6 (ARCHITECTURE.md): detect a Redis that lost acknowledged deletes.
//!
//! The worker keeps `cache-invalidator:<slot>:identity` in Redis: the Redis
//! `run_id` and PostgreSQL's system id and timeline. A Redis restored from an
//! older snapshot, or a promoted replica, has another `run_id` (or no identity
//! key at all): deletes acknowledged to PostgreSQL may be undone there, so the
//! worker flushes every mapped table before acknowledging anything more.
//!
//! A PostgreSQL promotion moves the timeline but keeps the system id; when
//! the slot the worker streams came through slot synchronization (17+), its
//! position continues the former primary's and nothing was missed:
//! [`promoted_from`] tells that case apart, and the worker then stores the
//! new identity without a flush (docs/operations.md, "PostgreSQL failover").

use std::fmt;

use redis::aio::ConnectionLike;

use super::error::SinkError;

/// What identifies the pair of servers whose consistency the worker keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Redis `run_id` (INFO server): new on every Redis start.
    pub redis_run_id: String,
    /// PostgreSQL `system_identifier` (IDENTIFY_SYSTEM).
    pub pg_system_id: String,
    /// PostgreSQL timeline.
    pub pg_timeline: u32,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "redis_run_id={} pg_system_id={} pg_timeline={}",
            self.redis_run_id, self.pg_system_id, self.pg_timeline
        )
    }
}

impl Identity {
    /// Parses the stored form (what `Display` writes).
    pub fn parse(stored: &str) -> Option<Identity> {
        let mut redis_run_id = None;
        let mut pg_system_id = None;
        let mut pg_timeline = None;
        for field in stored.split_whitespace() {
            match field.split_once('=')? {
                ("redis_run_id", v) => redis_run_id = Some(v.to_owned()),
                ("pg_system_id", v) => pg_system_id = Some(v.to_owned()),
                ("pg_timeline", v) => pg_timeline = v.parse().ok(),
                _ => return None,
            }
        }
        Some(Identity {
            redis_run_id: redis_run_id?,
            pg_system_id: pg_system_id?,
            pg_timeline: pg_timeline?,
        })
    }
}

/// When `stored` names the same Redis and the same PostgreSQL system as
/// `current` on an earlier timeline (a standby was promoted, or a backup of
/// the same system was restored to a new timeline): that earlier timeline.
/// Which of the two it was is not for the identity to say: the slot is
/// (synchronized from the former primary, or not).
pub fn promoted_from(stored: &str, current: &Identity) -> Option<u32> {
    let stored = Identity::parse(stored)?;
    (stored.redis_run_id == current.redis_run_id
        && stored.pg_system_id == current.pg_system_id
        && stored.pg_timeline < current.pg_timeline)
        .then_some(stored.pg_timeline)
}

/// The outcome of comparing the stored identity with the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityCheck {
    /// Same servers as when the worker last acknowledged.
    Unchanged,
    /// No identity stored: first run, or a Redis that lost it (restored from a
    /// snapshot older than the first run, or restarted empty).
    Missing,
    /// Another Redis or PostgreSQL than the stored one.
    Changed {
        /// What was stored.
        stored: String,
    },
}

/// The Redis key holding the identity for a slot.
pub fn identity_key(slot: &str) -> String {
    format!("cache-invalidator:{slot}:identity")
}

/// Redis's `run_id`, from `INFO server`.
pub async fn redis_run_id(
    conn: &mut (impl ConnectionLike + Send),
    target: &str,
) -> Result<String, SinkError> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .map_err(|source| SinkError::Redis {
            command: "INFO server",
            target: target.to_string(),
            source,
        })?;
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| SinkError::Config(format!("{target}: INFO server has no run_id")))
}

/// Compares the stored identity with `current`.
pub async fn check(
    conn: &mut (impl ConnectionLike + Send),
    target: &str,
    key: &str,
    current: &Identity,
) -> Result<IdentityCheck, SinkError> {
    let stored: Option<String> =
        redis::cmd("GET")
            .arg(key)
            .query_async(conn)
            .await
            .map_err(|source| SinkError::Redis {
                command: "GET identity",
                target: target.to_string(),
                source,
            })?;
    Ok(match stored {
        None => IdentityCheck::Missing,
        Some(s) if s == current.to_string() => IdentityCheck::Unchanged,
        Some(stored) => IdentityCheck::Changed { stored },
    })
}

/// Stores `current` as the identity (after a flush, or on first run).
pub async fn store(
    conn: &mut (impl ConnectionLike + Send),
    target: &str,
    key: &str,
    current: &Identity,
) -> Result<(), SinkError> {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(current.to_string())
        .query_async(conn)
        .await
        .map_err(|source| SinkError::Redis {
            command: "SET identity",
            target: target.to_string(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(run_id: &str, system: &str, timeline: u32) -> Identity {
        Identity {
            redis_run_id: run_id.into(),
            pg_system_id: system.into(),
            pg_timeline: timeline,
        }
    }

    #[test]
    fn the_stored_form_parses_back() {
        let id = identity("abc", "7412", 3);
        assert_eq!(Identity::parse(&id.to_string()), Some(id));
        assert_eq!(Identity::parse("redis_run_id=abc pg_system_id=1"), None);
        assert_eq!(Identity::parse("garbage"), None);
    }

    #[test]
    fn only_a_later_timeline_of_the_same_system_and_redis_is_a_promotion() {
        let stored = identity("r1", "7412", 1).to_string();
        assert_eq!(promoted_from(&stored, &identity("r1", "7412", 2)), Some(1));
        // Another Redis (restarted from a snapshot): not a promotion.
        assert_eq!(promoted_from(&stored, &identity("r2", "7412", 2)), None);
        // Another PostgreSQL system: not a promotion.
        assert_eq!(promoted_from(&stored, &identity("r1", "9999", 2)), None);
        // The same or an earlier timeline: not a promotion.
        assert_eq!(promoted_from(&stored, &identity("r1", "7412", 1)), None);
        assert_eq!(
            promoted_from(
                &identity("r1", "7412", 3).to_string(),
                &identity("r1", "7412", 2)
            ),
            None
        );
    }
}
