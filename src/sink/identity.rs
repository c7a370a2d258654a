//! Guarantee 6: detect a Redis that lost acknowledged deletes.
//!
//! The worker keeps `cache-invalidator:<slot>:identity` in Redis: the Redis
//! `run_id` and PostgreSQL's system id and timeline. A Redis restored from an
//! older snapshot, or a promoted replica, has another `run_id` (or no identity
//! key at all): deletes acknowledged to PostgreSQL may be undone there, so the
//! worker flushes every mapped table before acknowledging anything more.

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
