//! Application-side helpers: the Redis conventions the worker invalidates,
//! for applications written in Rust. The README shows the same in Python.
//!
//! ```no_run
//! # async fn demo() -> redis::RedisResult<()> {
//! use cache_invalidator::cache::{set_tagged, VersionedCache};
//! let client = redis::Client::open("redis://127.0.0.1/")?;
//! let mut conn = client.get_multiplexed_async_connection().await?;
//! // Cache a team's member list, tagged with every member: the users rule's
//! // `tags = ["user:{id}"]` deletes it when any member changes.
//! set_tagged(&mut conn, "team:5:members", "[...]", 300, &["user:123", "user:7"], "tag:").await?;
//! // Versioned keys: the worker bumps `version:user:123` on every change.
//! let cache = VersionedCache::new("version:");
//! let profile: Option<String> = cache.get(&mut conn, "user", "123", "profile").await?;
//! if profile.is_none() {
//!     cache.set(&mut conn, "user", "123", "profile", "{...}", 300).await?;
//! }
//! # Ok(()) }
//! ```

use redis::aio::ConnectionLike;
use redis::{AsyncCommands, RedisResult};

/// Seconds a tag set or version key outlives the data cached under it.
pub const TTL_MARGIN_SECS: u64 = 60;

/// SET `key` with a TTL, then add it to each tag set `<tag_prefix><tag>` and
/// extend the set's TTL (`EXPIRE NX` then `EXPIRE GT`: the TTL only grows), in
/// one pipeline on one connection, so the key is tracked right after it exists.
pub async fn set_tagged<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    value: &str,
    ttl_secs: u64,
    tags: &[&str],
    tag_prefix: &str,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(key)
        .arg(value)
        .arg("EX")
        .arg(ttl_secs)
        .ignore();
    let set_ttl = ttl_secs + TTL_MARGIN_SECS;
    for tag in tags {
        let set = format!("{tag_prefix}{tag}");
        pipe.cmd("SADD").arg(&set).arg(key).ignore();
        pipe.cmd("EXPIRE").arg(&set).arg(set_ttl).arg("NX").ignore();
        pipe.cmd("EXPIRE").arg(&set).arg(set_ttl).arg("GT").ignore();
    }
    pipe.query_async(conn).await
}

/// Version-based keys: `<entity>:<id>:v<version>:<suffix>`, the version read
/// from `<version_prefix><entity>:<id>` (missing = [`VersionedCache::missing_version`]).
#[derive(Debug, Clone)]
pub struct VersionedCache {
    version_prefix: String,
    missing_version: i64,
}

impl VersionedCache {
    /// Helpers for versions under `version_prefix` (e.g. `version:`), reading
    /// a missing version as 1 like the lesson's `VersionedCache`.
    pub fn new(version_prefix: &str) -> Self {
        VersionedCache {
            version_prefix: version_prefix.to_string(),
            missing_version: 1,
        }
    }

    /// The version a missing key reads as (1 by default; the worker bumps a
    /// missing key to 2, so readers using 0 or 1 both see a change).
    pub fn missing_version(mut self, version: i64) -> Self {
        self.missing_version = version;
        self
    }

    /// The version key of an entity.
    pub fn version_key(&self, entity: &str, id: &str) -> String {
        format!("{}{entity}:{id}", self.version_prefix)
    }

    /// The data key for a given version.
    pub fn data_key(entity: &str, id: &str, suffix: &str, version: i64) -> String {
        format!("{entity}:{id}:v{version}:{suffix}")
    }

    /// The current version of an entity.
    pub async fn get_version<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entity: &str,
        id: &str,
    ) -> RedisResult<i64> {
        let v: Option<i64> = conn.get(self.version_key(entity, id)).await?;
        Ok(v.unwrap_or(self.missing_version))
    }

    /// Reads the data cached under the current version. Reading the version
    /// first makes the read race-proof: a fill that lands after a bump is
    /// stored under the old version, which nobody reads any more.
    pub async fn get<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entity: &str,
        id: &str,
        suffix: &str,
    ) -> RedisResult<Option<String>> {
        let version = self.get_version(conn, entity, id).await?;
        conn.get(Self::data_key(entity, id, suffix, version)).await
    }

    /// Caches `value` under the current version with a TTL, and makes sure the
    /// version key outlives it (TTL extended to at least the data TTL plus a
    /// margin; a version key without TTL keeps none).
    pub async fn set<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entity: &str,
        id: &str,
        suffix: &str,
        value: &str,
        ttl_secs: u64,
    ) -> RedisResult<()> {
        let version = self.get_version(conn, entity, id).await?;
        let version_key = self.version_key(entity, id);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(Self::data_key(entity, id, suffix, version))
            .arg(value)
            .arg("EX")
            .arg(ttl_secs)
            .ignore();
        pipe.cmd("EXPIRE")
            .arg(&version_key)
            .arg(ttl_secs + TTL_MARGIN_SECS)
            .arg("GT")
            .ignore();
        pipe.query_async(conn).await
    }
}
