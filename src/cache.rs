//! Application-side helpers: the Redis conventions the worker invalidates,
//! for applications written in Rust. The README shows the same in Python.
//!
//! Race-proof reads (`docs/race-proof-fills.md`): [`get_or_fill`] for keys of
//! `mode = "tombstone"` rules (a guarded fill through the `scripts/guarded_fill.lua`
//! script, refused when a commit landed between the database read and the
//! fill), and [`VersionedCache::get_or_fill`] for versioned keys (one round
//! trip through `scripts/versioned_get.lua`, the fill under the version read
//! before the database). The Lua scripts are [`GUARDED_FILL`] and
//! [`VERSIONED_GET`], usable from any language.
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

use std::future::Future;
use std::sync::OnceLock;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

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

/// The guarded fill script (`scripts/guarded_fill.lua`): sets a value only if
/// the key still holds what the reader saw at its miss. See the file's header.
pub const GUARDED_FILL: &str = include_str!("../scripts/guarded_fill.lua");

/// The versioned read script (`scripts/versioned_get.lua`): the version and
/// the data under it in one round trip. See the file's header.
pub const VERSIONED_GET: &str = include_str!("../scripts/versioned_get.lua");

fn guarded_fill_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(GUARDED_FILL))
}

fn versioned_get_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(VERSIONED_GET))
}

/// The tombstone marker the worker writes for `mode = "tombstone"` rules.
///
/// Format: the byte `0x00`, then `cache-invalidator:tombstone:`, then the
/// commit LSN as 16 uppercase hexadecimal digits (45 bytes in all), e.g.
/// `"\0cache-invalidator:tombstone:000000000169A2F8"`. The leading NUL byte
/// keeps it apart from any text, JSON or msgpack map/array an application
/// caches; application values must never start with `PREFIX`.
/// Two tombstones compare by LSN. Readers that bypass the helpers must treat a
/// value starting with the prefix as a miss.
pub mod tombstone {
    use crate::lsn::Lsn;

    /// What every tombstone starts with.
    pub const PREFIX: &str = "\0cache-invalidator:tombstone:";

    /// An LSN as the 16 uppercase hex digits a tombstone carries.
    pub fn lsn_hex(lsn: Lsn) -> String {
        format!("{:016X}", lsn.0)
    }

    /// The tombstone of a commit LSN.
    pub fn marker(lsn: Lsn) -> String {
        format!("{PREFIX}{:016X}", lsn.0)
    }

    /// True when a cached value is a tombstone (or anything else starting with
    /// the prefix, which applications must never cache): a miss.
    pub fn is_tombstone(value: &[u8]) -> bool {
        value.starts_with(PREFIX.as_bytes())
    }

    /// The LSN of a well-formed tombstone.
    pub fn parse(value: &[u8]) -> Option<Lsn> {
        let hex = value.strip_prefix(PREFIX.as_bytes())?;
        if hex.len() != 16 {
            return None;
        }
        let hex = std::str::from_utf8(hex).ok()?;
        u64::from_str_radix(hex, 16).ok().map(Lsn)
    }
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A cached value.
    Hit(String),
    /// A miss; keep it to fill with [`guarded_fill`].
    Miss(Seen),
}

/// What a key held at a miss: the fill succeeds only if it still holds that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Nothing.
    Absent,
    /// This tombstone (the exact value).
    Tombstone(String),
}

impl Seen {
    /// The script's `ARGV[1]`: the tombstone, or the empty string for absent.
    fn as_arg(&self) -> &str {
        match self {
            Seen::Absent => "",
            Seen::Tombstone(t) => t,
        }
    }
}

/// GET a key and tell a value from a miss (nothing, or a tombstone).
pub async fn lookup<C: ConnectionLike + Send>(conn: &mut C, key: &str) -> RedisResult<Lookup> {
    let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(conn).await?;
    Ok(match v {
        None => Lookup::Miss(Seen::Absent),
        Some(v) if tombstone::is_tombstone(&v) => {
            Lookup::Miss(Seen::Tombstone(String::from_utf8_lossy(&v).into_owned()))
        }
        Some(v) => match String::from_utf8(v) {
            Ok(s) => Lookup::Hit(s),
            Err(e) => Lookup::Hit(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        },
    })
}

/// Sets `value` (TTL `ttl_secs`) and adds the key to each tag set
/// `<tag_prefix><tag>` only if the key still holds what `seen` says, in one
/// atomic script ([`GUARDED_FILL`]). Returns false when the fill was refused:
/// a commit invalidated the key since the miss, so the value may be stale.
/// A value starting with the tombstone prefix is refused with an error.
pub async fn guarded_fill<C: ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    seen: &Seen,
    value: &str,
    ttl_secs: u64,
    tags: &[&str],
    tag_prefix: &str,
) -> RedisResult<bool> {
    if tombstone::is_tombstone(value.as_bytes()) {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "a cached value must not start with the tombstone prefix",
        )));
    }
    let mut inv = guarded_fill_script().key(key);
    for tag in tags {
        inv.key(format!("{tag_prefix}{tag}"));
    }
    let filled: i64 = inv
        .arg(seen.as_arg())
        .arg(value)
        .arg(ttl_secs.max(1))
        .arg(ttl_secs.max(1) + TTL_MARGIN_SECS)
        .invoke_async(conn)
        .await?;
    Ok(filled == 1)
}

/// Why [`get_or_fill`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FillError<E> {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[source] redis::RedisError),
    /// The loader failed.
    #[error("loader: {0}")]
    Load(#[source] E),
}

/// Read-through with a guarded fill, for keys of `mode = "tombstone"` rules:
/// a hit is returned; on a miss `loader` reads the database and returns the
/// value and its tags, which are cached only if the key still holds what the
/// miss saw. The loaded value is returned either way (it is what the database
/// held when read; a refused fill only means it is not cached).
///
/// A key set by a `refresh` rule (JSON format) is a hit: its value, with the
/// worker's `_lsn` member, is returned without calling `loader`; a fill that
/// missed before the refresh landed is refused (`docs/pre-warm.md`).
pub async fn get_or_fill<C, F, Fut, E>(
    conn: &mut C,
    key: &str,
    ttl_secs: u64,
    tag_prefix: &str,
    loader: F,
) -> Result<String, FillError<E>>
where
    C: ConnectionLike + Send,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(String, Vec<String>), E>>,
{
    let seen = match lookup(conn, key).await.map_err(FillError::Redis)? {
        Lookup::Hit(v) => return Ok(v),
        Lookup::Miss(seen) => seen,
    };
    let (value, tags) = loader().await.map_err(FillError::Load)?;
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    guarded_fill(conn, key, &seen, &value, ttl_secs, &tags, tag_prefix)
        .await
        .map_err(FillError::Redis)?;
    Ok(value)
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
        let v: Option<i64> = redis::cmd("GET")
            .arg(self.version_key(entity, id))
            .query_async(conn)
            .await?;
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
        redis::cmd("GET")
            .arg(Self::data_key(entity, id, suffix, version))
            .query_async(conn)
            .await
    }

    /// The version and the data under it in one round trip ([`VERSIONED_GET`]).
    /// Fill a miss with [`VersionedCache::fill`] at the returned version.
    pub async fn get_versioned<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entity: &str,
        id: &str,
        suffix: &str,
    ) -> RedisResult<(i64, Option<String>)> {
        versioned_get_script()
            .key(self.version_key(entity, id))
            .arg(format!("{entity}:{id}"))
            .arg(suffix)
            .arg(self.missing_version)
            .invoke_async(conn)
            .await
    }

    /// Caches `value` under `version` (the one read before the database), with
    /// a TTL, and makes sure the version key outlives it. A fill of data read
    /// before a bump lands under the old version, which nobody reads after it.
    #[allow(clippy::too_many_arguments)]
    pub async fn fill<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entity: &str,
        id: &str,
        suffix: &str,
        version: i64,
        value: &str,
        ttl_secs: u64,
    ) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(Self::data_key(entity, id, suffix, version))
            .arg(value)
            .arg("EX")
            .arg(ttl_secs)
            .ignore();
        pipe.cmd("EXPIRE")
            .arg(self.version_key(entity, id))
            .arg(ttl_secs + TTL_MARGIN_SECS)
            .arg("GT")
            .ignore();
        pipe.query_async(conn).await
    }

    /// Race-proof read-through: one round trip for the version and the data;
    /// on a miss `loader` reads the database and the value is cached under the
    /// version read before it. Returns the cached or loaded value.
    pub async fn get_or_fill<C, F, Fut, E>(
        &self,
        conn: &mut C,
        entity: &str,
        id: &str,
        suffix: &str,
        ttl_secs: u64,
        loader: F,
    ) -> Result<String, FillError<E>>
    where
        C: ConnectionLike + Send,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<String, E>>,
    {
        let (version, data) = self
            .get_versioned(conn, entity, id, suffix)
            .await
            .map_err(FillError::Redis)?;
        if let Some(v) = data {
            return Ok(v);
        }
        let value = loader().await.map_err(FillError::Load)?;
        self.fill(conn, entity, id, suffix, version, &value, ttl_secs)
            .await
            .map_err(FillError::Redis)?;
        Ok(value)
    }

    /// Caches `value` under the version current *now*, with a TTL, and makes
    /// sure the version key outlives it (TTL extended to at least the data TTL
    /// plus a margin; a version key without TTL keeps none).
    ///
    /// Not race-proof when `value` was read from the database before this call:
    /// a bump in between stores old data under the new version. Prefer
    /// [`VersionedCache::get_or_fill`] or [`VersionedCache::fill`] with the
    /// version read before the database.
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
        self.fill(conn, entity, id, suffix, version, value, ttl_secs)
            .await
    }
}
