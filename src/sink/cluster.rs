//! The Redis Cluster executor: the same [`Plan`] contract as
//! [`RedisSink`](super::RedisSink), on the redis crate's async cluster client.
//!
//! How each step maps to a cluster (see `docs/redis-cluster.md`):
//!
//! - keys: grouped by hash slot, one `UNLINK` per slot group (in chunks), the
//!   groups sent concurrently; MOVED/ASK redirections and resharding are
//!   followed by the client;
//! - tombstones: the TOMBSTONE_SET script per key (one key, one slot); tag
//!   tombstones: `SSCAN` of the set here, TOMBSTONE_SET per member;
//! - tags: a tag set whose key has a hash tag (`tag:{user:1}`) runs
//!   [`TAG_POP_LOCAL`] in a loop, atomic like the single-server SPOP script;
//!   every other tag set (or one whose members turn out to live on another
//!   slot) runs the multi-slot path: `SSCAN` a chunk, `UNLINK` the members
//!   (grouped by slot), `SREM` exactly those members, `UNLINK` them again;
//! - versions: the VERSION_BUMP script per key;
//! - refreshed keys: the REFRESH_SET script per key, after the pattern pass;
//! - patterns: one `SCAN` pass over every master (from `CLUSTER NODES`),
//!   matched client-side;
//! - PUBLISH: sent to one node, Redis Cluster broadcasts it;
//! - WAIT (`wait_replicas > 0`): sent to every master, the smallest count wins.
//!
//! The crash window of the multi-slot tag path: a crash between the `UNLINK`
//! and the `SREM` leaves the (deleted) members in the set, harmless: they are
//! deleted again at the next invalidation of the tag. A member added between
//! the `SSCAN` and the `SREM` is not removed and stays tracked. A key re-tagged
//! between the first `UNLINK` and the `SREM` is deleted by the second `UNLINK`:
//! it is never left alive and untracked.

use super::patterns::{self, has_patterns, PatternMatch, PatternPass};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value};

use super::error::{mask_url, SinkError};
use super::{scripts, ApplyStats, SinkOptions, DEFAULT_TOMBSTONE_MS};
use crate::cache::tombstone::lsn_hex;
use crate::lsn::Lsn;
use crate::plan::Plan;

/// Keys per UNLINK command (within one slot).
const UNLINK_CHUNK: usize = 1000;
/// Keys SSCAN returns per call (a hint).
const SSCAN_COUNT: usize = 1000;
/// Commands in flight at once.
const CONCURRENCY: usize = 64;
/// How long WAIT waits for replicas before the plan is retried.
const WAIT_TIMEOUT_MS: u64 = 1000;
/// A command without a reply after this long fails the plan (retried whole)
/// and the connection is replaced: during slot migrations the cluster client
/// can wait on a redirection forever.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut`, or a timeout error after [`COMMAND_TIMEOUT`].
async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(reply) => reply,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no reply from the Redis Cluster within 10 s",
        ))),
    }
}

/// The sink's cluster connection with a [`COMMAND_TIMEOUT`] on every command;
/// routes each command by its key like the client's own connection.
#[derive(Clone)]
pub struct ClusterConn(ClusterConnection);

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { timed(self.0.req_packed_command(cmd)).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move { timed(self.0.req_packed_commands(pipeline, offset, count)).await })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The single-slot tag script on a cluster: like [`scripts::TAG_POP`], but it
/// reads the members with `SRANDMEMBER` and removes them with `SREM` only after
/// their `UNLINK` succeeded. A member on another slot makes the `UNLINK` fail
/// before anything changed (the set keeps every member), and the sink falls
/// back to the multi-slot path; with `SPOP` first, that failure would have
/// dropped live keys from their set. Returns how many members it removed.
pub const TAG_POP_LOCAL: &str = r"
local members = redis.call('SRANDMEMBER', KEYS[1], tonumber(ARGV[1]))
if #members > 0 then
  redis.call('UNLINK', unpack(members))
  redis.call('SREM', KEYS[1], unpack(members))
end
return #members
";

/// Executes plans against a Redis Cluster. Cheap to clone (one shared client).
#[derive(Clone)]
pub struct ClusterSink {
    client: ClusterClient,
    /// Shared by every clone; replaced by [`ClusterSink::reconnect`].
    conn: Arc<RwLock<ClusterConnection>>,
    target: String,
    tag_pop: Script,
    version_bump: Script,
    tombstone_set: Script,
    refresh_set: Script,
    tombstone_ms: u64,
    /// Keys per SCAN call of a pattern pass (`[worker] pattern_scan_count`).
    scan_count: usize,
    wait_replicas: u32,
    redelete_after: Option<Duration>,
}

/// Keys found by one step, sorted by kind, processed together.
#[derive(Default)]
struct Found {
    keys: Vec<String>,
    tags: Vec<String>,
    versions: Vec<String>,
}

impl Found {
    fn len(&self) -> usize {
        self.keys.len() + self.tags.len() + self.versions.len()
    }
}

/// True when `key` has a non-empty hash tag (`{...}`), so that the cluster
/// places it by that part only.
pub fn has_hash_tag(key: &str) -> bool {
    match key.find('{') {
        Some(open) => matches!(key[open + 1..].find('}'), Some(len) if len > 0),
        None => false,
    }
}

fn is_wrong_type(e: &RedisError) -> bool {
    let text = e.to_string();
    text.contains("WRONGTYPE") || text.contains("not an integer")
}

/// A script touched a key of another slot (members without the set's hash tag).
fn is_cross_slot(e: &RedisError) -> bool {
    let text = e.to_string();
    e.code() == Some("CROSSSLOT")
        || text.contains("CROSSSLOT")
        || text.contains("non local key")
        || text.contains("same slot")
}

/// `keys` grouped by hash slot, in chunks of at most [`UNLINK_CHUNK`].
fn slot_groups(keys: &[String]) -> Vec<Vec<String>> {
    let mut groups: HashMap<Slot, Vec<String>> = HashMap::new();
    for key in keys {
        groups
            .entry(Slot::for_key(key))
            .or_default()
            .push(key.clone());
    }
    groups
        .into_values()
        .flat_map(|g| {
            g.chunks(UNLINK_CHUNK)
                .map(<[String]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// UNLINKs `keys`, one command per slot group, concurrently.
async fn unlink_grouped(conn: &ClusterConn, keys: &[String]) -> Result<u64, RedisError> {
    stream::iter(slot_groups(keys).into_iter().map(|chunk| {
        let mut conn = conn.clone();
        async move {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&chunk)
                .query_async(&mut conn)
                .await?;
            Ok::<u64, RedisError>(chunk.len() as u64)
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
    .await
}

/// What invalidating one tag set did: (members, repaired).
type TagOutcome = (u64, u64);

impl ClusterSink {
    /// Connects to the cluster through its seed URLs (`[redis] cluster`);
    /// `options.url` is not used, its password override, WAIT and second pass
    /// are. TLS files are not supported on a cluster (a `rediss://` seed URL
    /// uses the system's certificate store).
    pub async fn connect(seeds: &[String], options: &SinkOptions) -> Result<Self, SinkError> {
        let target = seeds
            .iter()
            .map(|u| mask_url(u))
            .collect::<Vec<_>>()
            .join(",");
        if seeds.is_empty() {
            return Err(SinkError::Config(
                "[redis] cluster lists no seed URL".to_owned(),
            ));
        }
        if !options.tls.is_empty() {
            return Err(SinkError::Config(format!(
                "{target}: tls_ca_file, tls_cert_file and tls_key_file are not supported with [redis] cluster yet"
            )));
        }
        let mut builder = ClusterClient::builder(seeds.to_vec())
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(30))
            .retries(4);
        if let Some(password) = &options.password {
            builder = builder.password(password.clone());
        }
        let err = |source| SinkError::Redis {
            command: "connect",
            target: target.clone(),
            source,
        };
        let client = builder
            .build()
            .map_err(|e| SinkError::Config(format!("{target}: {}", super::redact(&e, options))))?;
        let conn = client.get_async_connection().await.map_err(err)?;
        Ok(ClusterSink {
            client,
            conn: Arc::new(RwLock::new(conn)),
            target,
            tag_pop: Script::new(TAG_POP_LOCAL),
            version_bump: Script::new(scripts::VERSION_BUMP),
            tombstone_set: Script::new(scripts::TOMBSTONE_SET),
            refresh_set: Script::new(scripts::REFRESH_SET),
            tombstone_ms: DEFAULT_TOMBSTONE_MS,
            scan_count: patterns::DEFAULT_SCAN_COUNT,
            wait_replicas: options.wait_replicas,
            redelete_after: options.redelete_after,
        })
    }

    /// Sets the hold time of tombstones (`[worker] tombstone_ms`; at least 1 ms).
    pub fn set_tombstone_hold(&mut self, hold: Duration) {
        self.tombstone_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
    }

    /// Sets the keys a pattern pass asks SCAN for per call
    /// (`[worker] pattern_scan_count`; at least 1).
    pub fn set_pattern_scan_count(&mut self, count: usize) {
        self.scan_count = count.max(1);
    }

    /// The seed URLs, passwords masked, comma-separated.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A connection sharing the sink's (routes each command by its key).
    pub fn connection(&self) -> ClusterConn {
        self.conn()
    }

    fn conn(&self) -> ClusterConn {
        let conn = match self.conn.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        ClusterConn(conn)
    }

    /// Replaces the shared connection with a new one (fresh slot map, fresh
    /// node connections), for every clone of this sink. Best effort.
    async fn reconnect(&self) {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_connection()).await {
            Ok(Ok(conn)) => {
                let mut shared = match self.conn.write() {
                    Ok(c) => c,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *shared = conn;
                tracing::info!(target_nodes = %self.target, "reconnected to the Redis Cluster");
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "reconnecting to the Redis Cluster failed")
            }
            Err(_) => tracing::warn!("reconnecting to the Redis Cluster timed out"),
        }
    }

    fn err(&self, command: &'static str) -> impl Fn(RedisError) -> SinkError + '_ {
        move |source| SinkError::Redis {
            command,
            target: self.target.clone(),
            source,
        }
    }

    /// The masters' addresses (host, port), from `CLUSTER NODES`.
    pub async fn masters(&self) -> Result<Vec<(String, u16)>, SinkError> {
        let mut conn = self.conn();
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(self.err("CLUSTER NODES"))?;
        let mut masters: Vec<(String, u16)> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (addr, flags) = (fields.get(1)?, fields.get(2)?);
                let flags: Vec<&str> = flags.split(',').collect();
                if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                    return None;
                }
                let addr = addr.split(['@', ',']).next()?;
                let (host, port) = addr.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect();
        masters.sort();
        masters.dedup();
        if masters.is_empty() {
            return Err(SinkError::Config(format!(
                "{}: CLUSTER NODES lists no master",
                self.target
            )));
        }
        Ok(masters)
    }

    /// One identity for the whole cluster: the `run_id`s of every master,
    /// sorted and comma-separated, so a restart (or failover) of any master
    /// changes it.
    pub async fn redis_run_id(&self) -> Result<String, SinkError> {
        let result = self.run_ids().await;
        self.heal(&result).await;
        result
    }

    /// Replaces the connection after a timeout or a connection error.
    async fn heal<T>(&self, result: &Result<T, SinkError>) {
        if let Err(SinkError::Redis { source, .. }) = result {
            if source.is_timeout() || source.is_io_error() || source.is_connection_dropped() {
                self.reconnect().await;
            }
        }
    }

    async fn run_ids(&self) -> Result<String, SinkError> {
        let mut ids = Vec::new();
        for (host, port) in self.masters().await? {
            let info = self
                .on_node(&host, port, redis::cmd("INFO").arg("server"))
                .await
                .map_err(self.err("INFO server"))?;
            let info: String =
                redis::from_redis_value(info).map_err(|e| self.err("INFO server")(e.into()))?;
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|s| s.trim().to_owned())
                .ok_or_else(|| {
                    SinkError::Config(format!("{host}:{port}: INFO server has no run_id"))
                })?;
            ids.push(id);
        }
        ids.sort();
        Ok(ids.join(","))
    }

    /// PING every master.
    pub async fn ping(&self) -> Result<(), SinkError> {
        let mut conn = self.conn();
        let result = redis::cmd("PING")
            .query_async::<Value>(&mut conn)
            .await
            .map(|_| ())
            .map_err(self.err("PING"));
        self.heal(&result).await;
        result
    }

    async fn on_node(&self, host: &str, port: u16, cmd: &redis::Cmd) -> Result<Value, RedisError> {
        let mut conn = self.conn();
        timed(conn.0.route_command(
            cmd.clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            }),
        ))
        .await
    }

    /// Executes every step of `plan`. On error nothing is known about which
    /// steps ran; retry the whole plan (every step is safe to repeat). After a
    /// timeout or a connection error the connection is replaced first.
    pub async fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, SinkError> {
        let result = self.apply_once(plan).await;
        self.heal(&result).await;
        result
    }

    async fn apply_once(&mut self, plan: &Plan) -> Result<ApplyStats, SinkError> {
        let mut stats = ApplyStats {
            tags: plan.tags.len() as u64,
            versions: plan.versions.len() as u64,
            ..ApplyStats::default()
        };
        let found = Found {
            keys: plan.keys.iter().map(str::to_owned).collect(),
            tags: plan.tags.iter().map(str::to_owned).collect(),
            versions: plan.versions.iter().map(str::to_owned).collect(),
        };
        self.run(found, &mut stats).await?;
        if !plan.tombstones.is_empty() {
            let items: Vec<(String, Lsn)> = plan
                .tombstones
                .iter()
                .map(|(k, lsn)| (k.clone(), *lsn))
                .collect();
            stats.tombstones += self.tombstone_keys(items).await?;
        }
        for (tag, lsn) in &plan.tombstone_tags {
            stats.tombstone_members += self.tombstone_tag(tag, *lsn, &mut stats).await?;
        }
        if has_patterns(plan) {
            self.scan_patterns(plan, &mut stats).await?;
        }
        if !plan.refresh.is_empty() {
            let outcome =
                super::refresh::apply_cluster(&self.conn(), &self.refresh_set, &plan.refresh)
                    .await
                    .map_err(self.err("EVALSHA refresh-set"))?;
            stats.refreshed += outcome.set;
            stats.refresh_kept += outcome.kept;
        }
        // In order, one at a time: subscribers see the messages of a batch in
        // commit order.
        for p in &plan.publish {
            let mut conn = self.conn();
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&p.channel)
                .arg(&p.message)
                .query_async(&mut conn)
                .await
                .map_err(self.err("PUBLISH"))?;
            stats.published += 1;
        }
        if self.wait_replicas > 0 {
            // The client sends WAIT to every master and returns the smallest count.
            let mut conn = self.conn();
            let acked: i64 = redis::cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(WAIT_TIMEOUT_MS)
                .query_async(&mut conn)
                .await
                .map_err(self.err("WAIT"))?;
            if acked < i64::from(self.wait_replicas) {
                return Err(SinkError::Replicas {
                    acked,
                    wanted: self.wait_replicas,
                    timeout_ms: WAIT_TIMEOUT_MS,
                });
            }
        }
        if let Some(delay) = self.redelete_after {
            if !(plan.keys.is_empty() && plan.tags.is_empty()) {
                let sink = self.clone();
                let found = Found {
                    keys: plan.keys.iter().map(str::to_owned).collect(),
                    tags: plan.tags.iter().map(str::to_owned).collect(),
                    versions: Vec::new(),
                };
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut stats = ApplyStats::default();
                    if let Err(err) = sink.run(found, &mut stats).await {
                        tracing::warn!(error = %err, "the delayed second delete (redelete_after_ms) failed; the first one succeeded");
                    }
                });
            }
        }
        Ok(stats)
    }

    /// Keys, then tags, then versions.
    async fn run(&self, found: Found, stats: &mut ApplyStats) -> Result<(), SinkError> {
        if !found.keys.is_empty() {
            stats.keys += unlink_grouped(&self.conn(), &found.keys)
                .await
                .map_err(self.err("UNLINK"))?;
        }
        let outcomes: Vec<TagOutcome> = stream::iter(found.tags.into_iter().map(|tag| {
            let sink = self.clone();
            async move { sink.invalidate_tag(&tag).await }
        }))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
        for (members, repaired) in outcomes {
            stats.tag_members += members;
            stats.repaired += repaired;
        }
        let repaired: Vec<u64> = stream::iter(found.versions.into_iter().map(|version| {
            let sink = self.clone();
            async move { sink.bump(&version).await }
        }))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
        stats.repaired += repaired.iter().sum::<u64>();
        Ok(())
    }

    /// Bumps one version key; returns 1 when a key of the wrong type was
    /// unlinked and the bump redone.
    async fn bump(&self, version: &str) -> Result<u64, SinkError> {
        let mut conn = self.conn();
        match self
            .version_bump
            .key(version)
            .invoke_async::<i64>(&mut conn)
            .await
        {
            Ok(_) => Ok(0),
            Err(e) if is_wrong_type(&e) => {
                tracing::warn!(error = %e, "a key under the version prefix is not an integer: unlinked it and bumped again (key not logged: it holds row values)");
                let _: i64 = redis::cmd("UNLINK")
                    .arg(version)
                    .query_async(&mut conn)
                    .await
                    .map_err(self.err("UNLINK"))?;
                let _: i64 = self
                    .version_bump
                    .key(version)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(self.err("EVALSHA version-bump"))?;
                Ok(1)
            }
            Err(e) => Err(self.err("EVALSHA version-bump")(e)),
        }
    }

    /// Invalidates one tag set: the single-slot script when the set's key has
    /// a hash tag, the multi-slot path otherwise (or when a member lives on
    /// another slot).
    async fn invalidate_tag(&self, tag: &str) -> Result<TagOutcome, SinkError> {
        let mut conn = self.conn();
        let mut members = 0u64;
        if has_hash_tag(tag) {
            loop {
                match self
                    .tag_pop
                    .key(tag)
                    .arg(scripts::TAG_POP_COUNT)
                    .invoke_async::<i64>(&mut conn)
                    .await
                {
                    Ok(n) => {
                        members += u64::try_from(n).unwrap_or(0);
                        if usize::try_from(n).unwrap_or(0) < scripts::TAG_POP_COUNT {
                            return Ok((members, 0));
                        }
                    }
                    Err(e) if is_wrong_type(&e) => return self.repair_tag(tag, members).await,
                    Err(e) if is_cross_slot(&e) => {
                        tracing::debug!(error = %e, "a hash-tagged tag set has members on other slots: using the multi-slot path");
                        break;
                    }
                    Err(e) => return Err(self.err("EVALSHA tag-pop")(e)),
                }
            }
        }
        let mut cursor: u64 = 0;
        loop {
            let reply: Result<(u64, Vec<String>), RedisError> = redis::cmd("SSCAN")
                .arg(tag)
                .arg(cursor)
                .arg("COUNT")
                .arg(SSCAN_COUNT)
                .query_async(&mut conn)
                .await;
            let (next, chunk) = match reply {
                Ok(r) => r,
                Err(e) if is_wrong_type(&e) => return self.repair_tag(tag, members).await,
                Err(e) => return Err(self.err("SSCAN")(e)),
            };
            if !chunk.is_empty() {
                // UNLINK, SREM exactly these, UNLINK again: a key re-tagged
                // in between is deleted, never left alive and untracked.
                unlink_grouped(&self.conn(), &chunk)
                    .await
                    .map_err(self.err("UNLINK tag members"))?;
                let _: i64 = redis::cmd("SREM")
                    .arg(tag)
                    .arg(&chunk)
                    .query_async(&mut conn)
                    .await
                    .map_err(self.err("SREM"))?;
                unlink_grouped(&self.conn(), &chunk)
                    .await
                    .map_err(self.err("UNLINK tag members"))?;
                members += chunk.len() as u64;
            }
            cursor = next;
            if cursor == 0 {
                return Ok((members, 0));
            }
        }
    }

    async fn repair_tag(&self, tag: &str, members: u64) -> Result<TagOutcome, SinkError> {
        tracing::warn!("a key under the tag prefix is not a set: unlinked it (key not logged: it holds row values)");
        let mut conn = self.conn();
        let _: i64 = redis::cmd("UNLINK")
            .arg(tag)
            .query_async(&mut conn)
            .await
            .map_err(self.err("UNLINK"))?;
        Ok((members, 1))
    }

    /// TOMBSTONE_SET per key (one key per call: one slot), concurrently.
    async fn tombstone_keys(&self, items: Vec<(String, Lsn)>) -> Result<u64, SinkError> {
        stream::iter(items.into_iter().map(|(key, lsn)| {
            let mut conn = self.conn();
            let script = self.tombstone_set.clone();
            let hold = self.tombstone_ms;
            async move {
                let _: i64 = script
                    .key(&key)
                    .arg(hold)
                    .arg(lsn_hex(lsn))
                    .invoke_async(&mut conn)
                    .await?;
                Ok::<u64, RedisError>(1)
            }
        }))
        .buffer_unordered(CONCURRENCY)
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await
        .map_err(self.err("EVALSHA tombstone-set"))
    }

    /// Tombstones every member of a tag set (SSCAN here, TOMBSTONE_SET per
    /// member); members stay in the set, as on a single server.
    async fn tombstone_tag(
        &self,
        tag: &str,
        lsn: Lsn,
        stats: &mut ApplyStats,
    ) -> Result<u64, SinkError> {
        let mut conn = self.conn();
        let mut cursor: u64 = 0;
        let mut seen = 0u64;
        loop {
            let reply: Result<(u64, Vec<String>), RedisError> = redis::cmd("SSCAN")
                .arg(tag)
                .arg(cursor)
                .arg("COUNT")
                .arg(SSCAN_COUNT)
                .query_async(&mut conn)
                .await;
            let (next, chunk) = match reply {
                Ok(r) => r,
                Err(e) if is_wrong_type(&e) => {
                    stats.repaired += self.repair_tag(tag, 0).await?.1;
                    return Ok(seen);
                }
                Err(e) => return Err(self.err("SSCAN")(e)),
            };
            seen += chunk.len() as u64;
            self.tombstone_keys(chunk.into_iter().map(|k| (k, lsn)).collect())
                .await?;
            cursor = next;
            if cursor == 0 {
                return Ok(seen);
            }
        }
    }

    /// One SCAN pass over every master for every pattern of the plan
    /// ([`super::patterns`]), the masters scanned concurrently; matches are
    /// processed as they accumulate.
    async fn scan_patterns(&self, plan: &Plan, stats: &mut ApplyStats) -> Result<(), SinkError> {
        let pass = PatternPass::new(plan, self.scan_count);
        let masters = self.masters().await?;
        let per_master = masters
            .iter()
            .map(|(host, port)| self.scan_master(&pass, host, *port));
        for master_stats in futures_util::future::try_join_all(per_master).await? {
            stats.add(&master_stats);
        }
        Ok(())
    }

    /// The pass over one master.
    async fn scan_master(
        &self,
        pass: &PatternPass,
        host: &str,
        port: u16,
    ) -> Result<ApplyStats, SinkError> {
        let mut stats = ApplyStats::default();
        let mut found = Found::default();
        let mut cursor: u64 = 0;
        loop {
            let reply = self
                .on_node(host, port, &pass.scan_cmd(cursor))
                .await
                .map_err(self.err("SCAN"))?;
            let (next, keys): (u64, Vec<String>) =
                redis::from_redis_value(reply).map_err(|e| self.err("SCAN")(e.into()))?;
            for key in keys {
                match pass.classify(&key, &mut stats) {
                    Some(PatternMatch::Key) => found.keys.push(key),
                    Some(PatternMatch::Tag) => found.tags.push(key),
                    Some(PatternMatch::Version) => found.versions.push(key),
                    None => {}
                }
            }
            // A pass under way, matches found but not all invalidated.
            crate::failpoint::failpoint(crate::failpoint::IN_PATTERN_PASS);
            if found.len() >= UNLINK_CHUNK {
                self.run(std::mem::take(&mut found), &mut stats).await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.run(found, &mut stats).await?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags() {
        assert!(has_hash_tag("tag:{user:1}"));
        assert!(has_hash_tag("{user:1}:profile"));
        assert!(!has_hash_tag("tag:user:1"));
        assert!(!has_hash_tag("tag:{}x"));
        assert!(!has_hash_tag("tag:{user"));
    }

    #[test]
    fn groups_keys_by_slot() {
        let keys: Vec<String> = vec!["{a}1".into(), "{a}2".into(), "b".into()];
        let groups = slot_groups(&keys);
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().any(|g| g.len() == 2));
    }
}
