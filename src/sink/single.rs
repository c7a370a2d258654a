//! [`RedisSink`], the executor of one Redis server: runs a [`Plan`] pipelined.
//!
//! Order within one plan: keys (UNLINK in chunks), tags (`EXISTS` per set;
//! the sets that exist get the SPOP script in the next round, up to
//! [`scripts::SCRIPT_KEYS_CHUNK`] sets per call) and versions (`SET key 2 NX`:
//! a missing version becomes 2; the keys that existed get `INCR key` in the
//! next round) in one pipeline per round; then one SCAN pass for every
//! pattern of the plan, matched client-side; then PUBLISH, after the deletes;
//! then `WAIT` when `wait_replicas > 0`. Everything is safe to repeat, so a
//! failed plan is retried whole.
//!
//! Tombstones (`mode = "tombstone"` rules) run in the same rounds, after the
//! UNLINKs (a key both unlinked and tombstoned ends as a tombstone): the
//! TOMBSTONE_SET script for keys, the TAG_TOMBSTONE SSCAN loop for tag sets;
//! their hold time is [`RedisSink::tune`] (default 10 s).
//!
//! Refreshed keys (`refresh` rules) are set last, after the pattern pass and
//! before PUBLISH, by the REFRESH_SET script ([`refresh`]), which never
//! replaces a newer version.
//!
//! Permanent errors on one key (WRONGTYPE on a tag set, "not an integer" on a
//! version key) unlink that key and redo the step, counted in
//! [`ApplyStats::repaired`]. NOPERM, OOM and READONLY are returned as
//! [`RetryClass::Blocked`](super::RetryClass::Blocked) errors.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, Script, Value};

use super::client::client;
use super::error::{mask_url, SinkError};
use super::patterns::{has_patterns, PatternPass};
use super::shared::{
    check_wait, is_wrong_type, redis_err, spawn_redelete, Found, Settings, SinkTuning,
    UNLINK_CHUNK, WAIT_TIMEOUT_MS,
};
use super::{refresh, scripts, ApplyStats, SinkOptions};
use crate::cache::tombstone::lsn_hex;
use crate::lsn::Lsn;
use crate::plan::Plan;

/// Executes plans against one Redis server.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    target: String,
    tag_pop: Script,
    tombstone_set: Script,
    tag_tombstone: Script,
    refresh_set: Script,
    settings: Settings,
}

/// One command of a round, mirrored beside the pipeline to read its reply.
enum Step<'a> {
    Unlink(usize),
    /// `EXISTS tag`: a set that exists is popped in the next round.
    TagExists(&'a str),
    TagPop(Vec<&'a str>),
    /// `SET version 2 NX`: a missing version key becomes 2; `nil` means it
    /// exists, and it is bumped in the next round.
    Create(&'a str),
    /// `INCR version` (an existing version key).
    Bump(&'a str),
    Tombstone(Vec<(&'a str, Lsn)>),
    TagTombstone(&'a str, Lsn),
}

impl Step<'_> {
    /// The command, as error messages name it.
    fn command(&self) -> &'static str {
        match self {
            Step::Unlink(_) => "UNLINK",
            Step::TagExists(_) => "EXISTS (tag)",
            Step::TagPop(_) => "EVALSHA tag-pop",
            Step::Create(_) => "SET NX (version)",
            Step::Bump(_) => "INCR (version)",
            Step::Tombstone(_) => "EVALSHA tombstone-set",
            Step::TagTombstone(..) => "EVALSHA tag-tombstone",
        }
    }
}

/// The work of one round: what the next pipeline sends. Borrows the names
/// from the plan (or the SCAN results): no copy per key.
#[derive(Default)]
struct Round<'a> {
    keys: Vec<&'a str>,
    /// Tag sets to invalidate: checked with `EXISTS` first.
    tags: Vec<&'a str>,
    /// Tag sets known to exist (or to hold more members): the SPOP script.
    pop_tags: Vec<&'a str>,
    /// Version keys to create as 2 or, when they exist, bump.
    versions: Vec<&'a str>,
    /// Version keys known to exist: `INCR`.
    bumps: Vec<&'a str>,
    tombstones: Vec<(&'a str, Lsn)>,
    /// (tag set, LSN, SSCAN cursor).
    tombstone_tags: Vec<(&'a str, Lsn, String)>,
}

impl<'a> From<&'a Found> for Round<'a> {
    /// A round over keys found by a SCAN pass or kept for the delayed second
    /// pass, borrowed.
    fn from(found: &'a Found) -> Self {
        Round {
            keys: found.keys.iter().map(String::as_str).collect(),
            tags: found.tags.iter().map(String::as_str).collect(),
            versions: found.versions.iter().map(String::as_str).collect(),
            ..Round::default()
        }
    }
}

impl Round<'_> {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.tags.is_empty()
            && self.pop_tags.is_empty()
            && self.versions.is_empty()
            && self.bumps.is_empty()
            && self.tombstones.is_empty()
            && self.tombstone_tags.is_empty()
    }
}

impl RedisSink {
    /// Connects (and reconnects, behind the scenes) to the Redis of `options`.
    pub async fn connect(options: &SinkOptions) -> Result<Self, SinkError> {
        let target = mask_url(&options.url);
        let client = client(options)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(redis_err(&target, "connect"))?;
        Ok(RedisSink {
            conn,
            target,
            tag_pop: Script::new(scripts::TAG_POP),
            tombstone_set: Script::new(scripts::TOMBSTONE_SET),
            tag_tombstone: Script::new(scripts::TAG_TOMBSTONE),
            refresh_set: Script::new(scripts::REFRESH_SET),
            settings: Settings::new(options),
        })
    }

    /// Takes what `[worker]` tunes (tombstone hold, pattern passes).
    pub fn tune(&mut self, tuning: &SinkTuning) {
        self.settings.tune(tuning);
    }

    /// The Redis URL with its password masked.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A connection sharing the sink's (for identity checks and helpers).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn err(&self, command: &'static str) -> impl Fn(redis::RedisError) -> SinkError + '_ {
        redis_err(&self.target, command)
    }

    /// Executes every step of `plan`. On error nothing is known about which
    /// steps ran; retry the whole plan.
    pub async fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, SinkError> {
        let mut stats = ApplyStats::for_plan(plan);
        if !has_patterns(plan) {
            self.settings.pacer.other_work();
        }
        let round = Round {
            keys: plan.keys.iter().collect(),
            tags: plan.tags.iter().collect(),
            versions: plan.versions.iter().collect(),
            pop_tags: Vec::new(),
            bumps: Vec::new(),
            tombstones: plan
                .tombstones
                .iter()
                .map(|(k, lsn)| (k.as_str(), *lsn))
                .collect(),
            tombstone_tags: plan
                .tombstone_tags
                .iter()
                .map(|(k, lsn)| (k.as_str(), *lsn, "0".to_owned()))
                .collect(),
        };
        self.run_rounds(round, &mut stats).await?;
        if has_patterns(plan) {
            self.scan_patterns(plan, &mut stats).await?;
        }
        if !plan.refresh.is_empty() {
            let outcome = refresh::apply_single(&mut self.conn, &self.refresh_set, &plan.refresh)
                .await
                .map_err(self.err("EVALSHA refresh-set"))?;
            stats.refreshed += outcome.set;
            stats.refresh_kept += outcome.kept;
        }
        if !plan.publish.is_empty() {
            let mut pipe = redis::pipe();
            for p in &plan.publish {
                pipe.cmd("PUBLISH").arg(&p.channel).arg(&p.message);
            }
            let replies = self.send(&pipe, plan.publish.len(), "PUBLISH").await?;
            for reply in replies {
                if let Value::ServerError(e) = reply {
                    return Err(self.err("PUBLISH")(e.into()));
                }
            }
            stats.published += plan.publish.len() as u64;
        }
        if self.settings.wait_replicas > 0 {
            let acked: i64 = redis::cmd("WAIT")
                .arg(self.settings.wait_replicas)
                .arg(WAIT_TIMEOUT_MS)
                .query_async(&mut self.conn)
                .await
                .map_err(self.err("WAIT"))?;
            check_wait(acked, self.settings.wait_replicas)?;
        }
        if let Some(delay) = self.settings.redelete_after {
            // Copies the plan's keys only when a second delete is configured.
            if let Some(found) = Found::redelete(plan) {
                let mut sink = self.clone();
                sink.settings.redelete_after = None;
                spawn_redelete(delay, async move {
                    let mut stats = ApplyStats::default();
                    sink.run_rounds(Round::from(&found), &mut stats).await
                });
            }
        }
        Ok(stats)
    }

    async fn send(
        &mut self,
        pipe: &Pipeline,
        n: usize,
        command: &'static str,
    ) -> Result<Vec<Value>, SinkError> {
        self.conn
            .req_packed_commands(pipe, 0, n)
            .await
            .map_err(self.err(command))
    }

    async fn load_scripts(&mut self) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(scripts::TAG_POP);
        pipe.cmd("SCRIPT").arg("LOAD").arg(scripts::TOMBSTONE_SET);
        pipe.cmd("SCRIPT").arg("LOAD").arg(scripts::TAG_TOMBSTONE);
        let _: () = pipe
            .query_async(&mut self.conn)
            .await
            .map_err(self.err("SCRIPT LOAD"))?;
        Ok(())
    }

    /// Runs keys, tags and versions in pipelined rounds until nothing is left:
    /// a tag set larger than one SPOP batch, a NOSCRIPT, or a repaired key
    /// brings its step back into the next round.
    async fn run_rounds<'a>(
        &mut self,
        mut round: Round<'a>,
        stats: &mut ApplyStats,
    ) -> Result<(), SinkError> {
        while !round.is_empty() {
            let mut pipe = redis::pipe();
            let mut steps = Vec::new();
            for chunk in round.keys.chunks(UNLINK_CHUNK) {
                pipe.cmd("UNLINK").arg(chunk);
                steps.push(Step::Unlink(chunk.len()));
            }
            for chunk in round.tombstones.chunks(scripts::TOMBSTONE_CHUNK) {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.tombstone_set.get_hash())
                    .arg(chunk.len());
                for (key, _) in chunk {
                    cmd.arg(key);
                }
                cmd.arg(self.settings.tombstone_ms);
                for (_, lsn) in chunk {
                    cmd.arg(lsn_hex(*lsn));
                }
                steps.push(Step::Tombstone(chunk.to_vec()));
            }
            round.tombstones.clear();
            for (tag, lsn, cursor) in round.tombstone_tags.drain(..) {
                pipe.cmd("EVALSHA")
                    .arg(self.tag_tombstone.get_hash())
                    .arg(1)
                    .arg(tag)
                    .arg(&cursor)
                    .arg(scripts::TAG_POP_COUNT)
                    .arg(lsn_hex(lsn))
                    .arg(self.settings.tombstone_ms);
                steps.push(Step::TagTombstone(tag, lsn));
            }
            // Most tag sets of a busy table do not exist (nothing cached under
            // them): a plain EXISTS costs Redis a fraction of a script's call
            // per set, and only the sets that exist get the script. A set
            // created after the check was filled after the commit, like a
            // fill that lands after the pop.
            for &tag in &round.tags {
                pipe.cmd("EXISTS").arg(tag);
                steps.push(Step::TagExists(tag));
            }
            round.tags.clear();
            for chunk in round.pop_tags.chunks(scripts::SCRIPT_KEYS_CHUNK) {
                pipe.cmd("EVALSHA")
                    .arg(self.tag_pop.get_hash())
                    .arg(chunk.len())
                    .arg(chunk)
                    .arg(scripts::TAG_POP_COUNT);
                steps.push(Step::TagPop(chunk.to_vec()));
            }
            round.pop_tags.clear();
            // Plain commands instead of a script (a Lua call costs Redis more):
            // `SET key 2 NX` creates a missing version as 2 (readers of a
            // missing key as 0 or as 1 both see a new version) and is all a
            // missing key needs; a key that exists gets `INCR` in the next
            // round. Should it expire in between, INCR makes it 1: harmless,
            // as a version key outlives the data cached under it (README,
            // "Redis conventions")
            // and this runs after the commit.
            for &version in &round.versions {
                pipe.cmd("SET").arg(version).arg(2).arg("NX");
                steps.push(Step::Create(version));
            }
            round.versions.clear();
            for &version in &round.bumps {
                pipe.cmd("INCR").arg(version);
                steps.push(Step::Bump(version));
            }
            round.bumps.clear();
            round.keys.clear();
            let replies = self
                .send(&pipe, steps.len(), "UNLINK/EVALSHA pipeline")
                .await?;
            let mut next = Round::default();
            let mut need_scripts = false;
            for (step, reply) in steps.into_iter().zip(replies) {
                match (step, reply) {
                    (Step::Unlink(n), Value::Int(_)) => stats.keys += n as u64,
                    (Step::TagExists(tag), Value::Int(n)) => {
                        if n > 0 {
                            next.pop_tags.push(tag);
                        }
                    }
                    (Step::TagPop(tags), Value::Array(reply)) => {
                        let (popped, again, wrong) = match reply.as_slice() {
                            [Value::Int(popped), Value::Array(again), Value::Array(wrong)] => {
                                (*popped, again, wrong)
                            }
                            other => return Err(self.unexpected("EVALSHA tag-pop", other)),
                        };
                        stats.tag_members += u64::try_from(popped).unwrap_or(0);
                        for tag in picked(&tags, again) {
                            next.pop_tags.push(tag);
                        }
                        for tag in picked(&tags, wrong) {
                            tracing::warn!("a key under the tag prefix is not a set: unlinked it (key not logged: it holds row values)");
                            stats.repaired += 1;
                            next.keys.push(tag);
                        }
                    }
                    (Step::Create(_), Value::Okay) => {}
                    (Step::Create(version), Value::Nil) => next.bumps.push(version),
                    (Step::Bump(_), Value::Int(_)) => {}
                    (Step::Tombstone(chunk), Value::Int(_)) => {
                        stats.tombstones += chunk.len() as u64;
                    }
                    (Step::TagTombstone(tag, lsn), Value::Array(items)) => {
                        let (cursor, seen) = match items.as_slice() {
                            [Value::BulkString(c), Value::Int(n)] => {
                                (String::from_utf8_lossy(c).into_owned(), *n)
                            }
                            other => return Err(self.unexpected("EVALSHA tag-tombstone", other)),
                        };
                        stats.tombstone_members += u64::try_from(seen).unwrap_or(0);
                        if cursor != "0" {
                            next.tombstone_tags.push((tag, lsn, cursor));
                        }
                    }
                    (step, Value::ServerError(e)) => {
                        let e: redis::RedisError = e.into();
                        let text = e.to_string();
                        if e.code() == Some("NOSCRIPT") || text.contains("NOSCRIPT") {
                            need_scripts = true;
                            match step {
                                Step::TagPop(t) => next.pop_tags.extend(t),
                                Step::Tombstone(chunk) => next.tombstones.extend(chunk),
                                // Restart the SSCAN: repeating it is harmless.
                                Step::TagTombstone(t, lsn) => {
                                    next.tombstone_tags.push((t, lsn, "0".to_owned()))
                                }
                                other => return Err(self.err(other.command())(e)),
                            }
                        } else if is_wrong_type(&e) {
                            // A key of the wrong type under the tag or version
                            // prefix (the tag script reports its own in the reply).
                            stats.repaired += 1;
                            match step {
                                Step::TagTombstone(t, _) => {
                                    tracing::warn!(error = %text, "a key under the tag prefix is not a set: unlinked it (key not logged: it holds row values)");
                                    next.keys.push(t);
                                }
                                Step::Bump(v) => {
                                    tracing::warn!(error = %text, "a key under the version prefix is not an integer: unlinked it and bumped again (key not logged: it holds row values)");
                                    self.unlink_one(v).await?;
                                    next.versions.push(v);
                                }
                                other => return Err(self.err(other.command())(e)),
                            }
                        } else {
                            return Err(self.err(step.command())(e));
                        }
                    }
                    (_, other) => return Err(self.unexpected("pipeline", &[other])),
                }
            }
            if need_scripts {
                self.load_scripts().await?;
            }
            round = next;
        }
        Ok(())
    }

    /// A reply of a shape the sink did not ask for.
    fn unexpected(&self, command: &'static str, reply: &[Value]) -> SinkError {
        self.err(command)(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected reply",
            format!("{reply:?}"),
        )))
    }

    async fn unlink_one(&mut self, key: &str) -> Result<(), SinkError> {
        let _: i64 = redis::cmd("UNLINK")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .map_err(self.err("UNLINK"))?;
        Ok(())
    }

    /// One SCAN pass over the keyspace for every pattern of the plan
    /// ([`patterns`]); matches are processed in rounds as they accumulate.
    async fn scan_patterns(
        &mut self,
        plan: &Plan,
        stats: &mut ApplyStats,
    ) -> Result<(), SinkError> {
        let pass = PatternPass::new(plan, self.settings.scan_count);
        let mut cursor: u64 = 0;
        let mut found = Found::default();
        loop {
            let call = std::time::Instant::now();
            let (next, keys): (u64, Vec<String>) = pass
                .scan_cmd(cursor)
                .query_async(&mut self.conn)
                .await
                .map_err(self.err("SCAN"))?;
            let call = call.elapsed();
            found.add_matches(&pass, keys, stats);
            // A pass under way, matches found but not all invalidated.
            crate::failpoint::failpoint(crate::failpoint::IN_PATTERN_PASS);
            if found.len() >= UNLINK_CHUNK {
                let batch = std::mem::take(&mut found);
                self.run_rounds(Round::from(&batch), stats).await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
            self.settings.pacer.rest(call).await;
        }
        self.run_rounds(Round::from(&found), stats).await
    }
}

/// The entries of `items` at the 1-based `indexes` a script returned
/// (indexes out of range are ignored).
fn picked<'s, 'a>(
    items: &'s [&'a str],
    indexes: &'s [Value],
) -> impl Iterator<Item = &'a str> + 's {
    indexes.iter().filter_map(|i| match i {
        Value::Int(i) => usize::try_from(*i)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| items.get(i).copied()),
        _ => None,
    })
}
