//! Pre-warming (`refresh` rules): sets a plan's refreshed keys with the
//! REFRESH_SET script, which writes a key only if Redis holds no newer
//! version of it (`scripts/refresh_set.lua`, `docs/pre-warm.md`).
//!
//! Both executors run this after every delete of the plan (keys, tags,
//! versions, tombstones, pattern passes) and before PUBLISH: a refresh that
//! the planner kept is the last word on its key in the batch. One server:
//! the keys go in pipelined calls of up to [`REFRESH_CHUNK`] keys. A
//! cluster: one call per key (one slot), concurrently.

use futures_util::stream::{self, StreamExt, TryStreamExt};
use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, Script, ScriptInvocation, ToRedisArgs, Value};

use crate::map::RefreshFormat;
use crate::plan::{RefreshMap, RefreshSet, RefreshValue};

/// Keys per REFRESH_SET call on one server (values are small rows; the
/// pipeline carries several calls).
pub const REFRESH_CHUNK: usize = 200;

/// Calls in flight at once on a cluster.
const CLUSTER_CONCURRENCY: usize = 64;

/// What setting a plan's refreshes did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshOutcome {
    /// Keys set.
    pub set: u64,
    /// Keys left as they were: Redis held a newer version (a replay after a
    /// crash, or a newer tombstone).
    pub kept: u64,
}

/// What a REFRESH_SET call's arguments are appended to: an EVALSHA command
/// (one server) or a script invocation (a cluster).
trait Args {
    fn push<T: ToRedisArgs>(&mut self, arg: T);
}

impl Args for Cmd {
    fn push<T: ToRedisArgs>(&mut self, arg: T) {
        self.arg(arg);
    }
}

impl Args for ScriptInvocation<'_> {
    fn push<T: ToRedisArgs>(&mut self, arg: T) {
        self.arg(arg);
    }
}

/// Appends one key's arguments to a REFRESH_SET call (after its keys).
fn push_args(call: &mut impl Args, set: &RefreshSet) {
    call.push(set.version.to_string());
    call.push(set.ttl_s.unwrap_or(0));
    match &set.value {
        RefreshValue::Json(text) => {
            call.push(RefreshFormat::Json.as_str());
            call.push(1);
            call.push(text);
        }
        RefreshValue::Hash(fields) => {
            call.push(RefreshFormat::Hash.as_str());
            call.push(fields.len() * 2);
            for (field, value) in fields {
                call.push(field);
                call.push(value);
            }
        }
    }
}

/// One EVALSHA of REFRESH_SET over `items`.
fn call(script: &Script, items: &[(&String, &RefreshSet)]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(items.len());
    for (key, _) in items {
        cmd.arg(key.as_str());
    }
    for (_, set) in items {
        push_args(&mut cmd, set);
    }
    cmd
}

fn is_noscript(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT") || e.to_string().contains("NOSCRIPT")
}

fn unexpected(reply: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply to EVALSHA refresh-set",
        format!("{reply:?}"),
    ))
}

/// Sets every refresh of `refresh` on one server: pipelined REFRESH_SET
/// calls; on NOSCRIPT the script is loaded and the calls are sent again
/// (each is safe to repeat).
pub async fn apply_single<C: ConnectionLike>(
    conn: &mut C,
    script: &Script,
    refresh: &RefreshMap,
) -> Result<RefreshOutcome, RedisError> {
    let items: Vec<(&String, &RefreshSet)> = refresh.iter().collect();
    let mut outcome = RefreshOutcome::default();
    let mut pipe = redis::pipe();
    let mut sizes = Vec::new();
    for chunk in items.chunks(REFRESH_CHUNK) {
        pipe.add_command(call(script, chunk));
        sizes.push(chunk.len() as u64);
    }
    for attempt in 0..2 {
        let replies = conn.req_packed_commands(&pipe, 0, sizes.len()).await?;
        let mut noscript = false;
        for (reply, n) in replies.iter().zip(&sizes) {
            match reply {
                Value::Int(set) => {
                    let set = u64::try_from(*set).unwrap_or(0).min(*n);
                    outcome.set += set;
                    outcome.kept += n - set;
                }
                Value::ServerError(e) => {
                    let e: RedisError = e.clone().into();
                    if is_noscript(&e) && attempt == 0 {
                        noscript = true;
                    } else {
                        return Err(e);
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        if !noscript {
            return Ok(outcome);
        }
        // Some calls ran, some did not: load the script and send them all
        // again (a key set by the first send is kept by the second).
        outcome = RefreshOutcome::default();
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(crate::sink::scripts::REFRESH_SET)
            .query_async(conn)
            .await?;
    }
    Ok(outcome)
}

/// Sets every refresh of `refresh` on a cluster: one REFRESH_SET call per
/// key (one slot), concurrently (the script object loads itself on NOSCRIPT).
pub async fn apply_cluster<C: ConnectionLike + Clone + Send + 'static>(
    conn: &C,
    script: &Script,
    refresh: &RefreshMap,
) -> Result<RefreshOutcome, RedisError> {
    // Collected first, borrowing the map: a lazy map over it would make the
    // sink's future not Send (a rustc limitation), and cloning every key and
    // row to dodge that costs allocations per key.
    let calls: Vec<_> = refresh
        .iter()
        .map(|(key, set)| {
            let mut conn = conn.clone();
            async move {
                let mut invocation = script.key(key.as_str());
                push_args(&mut invocation, set);
                let set: i64 = invocation.invoke_async(&mut conn).await?;
                Ok::<RefreshOutcome, RedisError>(if set > 0 {
                    RefreshOutcome { set: 1, kept: 0 }
                } else {
                    RefreshOutcome { set: 0, kept: 1 }
                })
            }
        })
        .collect();
    stream::iter(calls)
        .buffer_unordered(CLUSTER_CONCURRENCY)
        .try_fold(RefreshOutcome::default(), |sum, o| async move {
            Ok(RefreshOutcome {
                set: sum.set + o.set,
                kept: sum.kept + o.kept,
            })
        })
        .await
}
