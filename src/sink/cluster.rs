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

mod slots;
mod tags;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisError, Script, Value};

pub use slots::{has_hash_tag, ClusterConn};
pub use tags::TAG_POP_LOCAL;

use super::error::{mask_url, SinkError};
use super::patterns::{has_patterns, PatternPass};
use super::shared::{
    check_wait, is_wrong_type, redis_err, spawn_redelete, Found, Settings, SinkTuning,
    UNLINK_CHUNK, WAIT_TIMEOUT_MS,
};
use super::{scripts, ApplyStats, SinkOptions};
use crate::lsn::Lsn;
use crate::plan::Plan;
use slots::{concurrently, timed, unlink_grouped, COMMAND_TIMEOUT};
use tags::TagOutcome;

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
    settings: Settings,
}

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
        let client = builder.build().map_err(|e| {
            SinkError::Config(format!("{target}: {}", super::client::redact(&e, options)))
        })?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(redis_err(&target, "connect"))?;
        Ok(ClusterSink {
            client,
            conn: Arc::new(RwLock::new(conn)),
            target,
            tag_pop: Script::new(TAG_POP_LOCAL),
            version_bump: Script::new(scripts::VERSION_BUMP),
            tombstone_set: Script::new(scripts::TOMBSTONE_SET),
            refresh_set: Script::new(scripts::REFRESH_SET),
            settings: Settings::new(options),
        })
    }

    /// Takes what `[worker]` tunes (tombstone hold, pattern passes).
    pub fn tune(&mut self, tuning: &SinkTuning) {
        self.settings.tune(tuning);
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
        redis_err(&self.target, command)
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
        let mut stats = ApplyStats::for_plan(plan);
        if !has_patterns(plan) {
            self.settings.pacer.other_work();
        }
        let keys: Vec<&str> = plan.keys.iter().collect();
        let tags: Vec<&str> = plan.tags.iter().collect();
        let versions: Vec<&str> = plan.versions.iter().collect();
        self.run(&keys, &tags, &versions, &mut stats).await?;
        if !plan.tombstones.is_empty() {
            let items: Vec<(&str, Lsn)> = plan
                .tombstones
                .iter()
                .map(|(k, lsn)| (k.as_str(), *lsn))
                .collect();
            stats.tombstones += self.tombstone_keys(&items).await?;
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
        if self.settings.wait_replicas > 0 {
            // The client sends WAIT to every master and returns the smallest count.
            let mut conn = self.conn();
            let acked: i64 = redis::cmd("WAIT")
                .arg(self.settings.wait_replicas)
                .arg(WAIT_TIMEOUT_MS)
                .query_async(&mut conn)
                .await
                .map_err(self.err("WAIT"))?;
            check_wait(acked, self.settings.wait_replicas)?;
        }
        if let Some(delay) = self.settings.redelete_after {
            // Copies the plan's keys only when a second delete is configured.
            if let Some(found) = Found::redelete(plan) {
                let sink = self.clone();
                spawn_redelete(delay, async move {
                    let mut stats = ApplyStats::default();
                    sink.run_found(&found, &mut stats).await
                });
            }
        }
        Ok(stats)
    }

    /// Keys, then tags, then versions, borrowed: tag sets and version keys
    /// run concurrently on this sink, no copy per key.
    async fn run<K: AsRef<str> + Sync>(
        &self,
        keys: &[K],
        tags: &[K],
        versions: &[K],
        stats: &mut ApplyStats,
    ) -> Result<(), SinkError> {
        if !keys.is_empty() {
            stats.keys += unlink_grouped(&self.conn(), keys)
                .await
                .map_err(self.err("UNLINK"))?;
        }
        let tag_runs = tags.iter().map(|tag| self.invalidate_tag(tag.as_ref()));
        let outcomes: Vec<TagOutcome> = concurrently(tag_runs.collect()).await?;
        for (members, repaired) in outcomes {
            stats.tag_members += members;
            stats.repaired += repaired;
        }
        let bumps = versions.iter().map(|version| self.bump(version.as_ref()));
        let repaired = concurrently(bumps.collect()).await?;
        stats.repaired += repaired.iter().sum::<u64>();
        Ok(())
    }

    /// [`ClusterSink::run`] over what a SCAN pass found or the delayed second
    /// delete repeats.
    async fn run_found(&self, found: &Found, stats: &mut ApplyStats) -> Result<(), SinkError> {
        self.run(&found.keys, &found.tags, &found.versions, stats)
            .await
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

    /// One SCAN pass over every master for every pattern of the plan
    /// ([`super::patterns`]), the masters scanned concurrently; matches are
    /// processed as they accumulate.
    async fn scan_patterns(&self, plan: &Plan, stats: &mut ApplyStats) -> Result<(), SinkError> {
        let pass = PatternPass::new(plan, self.settings.scan_count);
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
            let call = std::time::Instant::now();
            let reply = self
                .on_node(host, port, &pass.scan_cmd(cursor))
                .await
                .map_err(self.err("SCAN"))?;
            let call = call.elapsed();
            let (next, keys): (u64, Vec<String>) =
                redis::from_redis_value(reply).map_err(|e| self.err("SCAN")(e.into()))?;
            found.add_matches(pass, keys, &mut stats);
            // A pass under way, matches found but not all invalidated.
            crate::failpoint::failpoint(crate::failpoint::IN_PATTERN_PASS);
            if found.len() >= UNLINK_CHUNK {
                self.run_found(&std::mem::take(&mut found), &mut stats)
                    .await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
            self.settings.pacer.rest(call).await;
        }
        self.run_found(&found, &mut stats).await?;
        Ok(stats)
    }
}
