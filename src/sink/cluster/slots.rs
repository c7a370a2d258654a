//! The cluster connection and slots: every command under a timeout,
//! hash tags, keys grouped by slot and unlinked concurrently.

use std::collections::HashMap;
use std::time::Duration;

use std::future::Future;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use super::UNLINK_CHUNK;

/// Commands in flight at once.
const CONCURRENCY: usize = 64;

/// A command without a reply after this long fails the plan (retried whole)
/// and the connection is replaced: during slot migrations the cluster client
/// can wait on a redirection forever.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut`, or a timeout error after [`COMMAND_TIMEOUT`].
pub(super) async fn timed<T>(
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

/// The sink's cluster connection with a timeout (`COMMAND_TIMEOUT`) on every command;
/// routes each command by its key like the client's own connection.
#[derive(Clone)]
pub struct ClusterConn(pub(super) ClusterConnection);

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

/// True when `key` has a non-empty hash tag (`{...}`), so that the cluster
/// places it by that part only.
pub fn has_hash_tag(key: &str) -> bool {
    match key.find('{') {
        Some(open) => matches!(key[open + 1..].find('}'), Some(len) if len > 0),
        None => false,
    }
}

/// A script touched a key of another slot (members without the set's hash tag).
pub(super) fn is_cross_slot(e: &RedisError) -> bool {
    let text = e.to_string();
    e.code() == Some("CROSSSLOT")
        || text.contains("CROSSSLOT")
        || text.contains("non local key")
        || text.contains("same slot")
}

/// `keys` grouped by hash slot, borrowed.
fn slot_groups<K: AsRef<str>>(keys: &[K]) -> Vec<Vec<&str>> {
    let mut groups: HashMap<Slot, Vec<&str>> = HashMap::new();
    for key in keys.iter().map(AsRef::as_ref) {
        groups.entry(Slot::for_key(key)).or_default().push(key);
    }
    groups.into_values().collect()
}

/// Runs `calls`, at most [`CONCURRENCY`] at a time; the first error fails
/// them all. The calls come collected: a lazy map over borrowed names would
/// make the sink's futures not Send (a rustc limitation).
pub(super) async fn concurrently<T, E>(
    calls: Vec<impl Future<Output = Result<T, E>>>,
) -> Result<Vec<T>, E> {
    stream::iter(calls)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// UNLINKs `keys`, one command per slot group (in chunks of at most
/// [`UNLINK_CHUNK`]), concurrently.
pub(super) async fn unlink_grouped<K: AsRef<str> + Sync>(
    conn: &ClusterConn,
    keys: &[K],
) -> Result<u64, RedisError> {
    let groups = slot_groups(keys);
    let unlinks: Vec<_> = groups
        .iter()
        .flat_map(|group| group.chunks(UNLINK_CHUNK))
        .map(|chunk| {
            let mut conn = conn.clone();
            async move {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(chunk)
                    .query_async(&mut conn)
                    .await?;
                Ok::<u64, RedisError>(chunk.len() as u64)
            }
        })
        .collect();
    Ok(concurrently(unlinks).await?.iter().sum())
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
        let groups = slot_groups(&["{a}1", "{a}2", "b"]);
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().any(|g| g.len() == 2));
    }
}
