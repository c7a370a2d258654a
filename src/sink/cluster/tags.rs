//! Tag sets on a cluster: the single-slot script or the multi-slot path,
//! repairing a key of the wrong type, and tombstones (per key, and every
//! member of a tag set).

use redis::RedisError;

use super::slots::{concurrently, has_hash_tag, is_cross_slot, unlink_grouped, ClusterConn};
use super::{is_wrong_type, scripts, ApplyStats, ClusterSink, Lsn, SinkError};
use crate::cache::tombstone::lsn_hex;

/// Keys SSCAN returns per call (a hint).
const SSCAN_COUNT: usize = 1000;

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

/// What invalidating one tag set did: (members, repaired).
pub(super) type TagOutcome = (u64, u64);

impl ClusterSink {
    /// Invalidates one tag set: the single-slot script when the set's key has
    /// a hash tag, the multi-slot path otherwise (or when a member lives on
    /// another slot).
    pub(super) async fn invalidate_tag(&self, tag: &str) -> Result<TagOutcome, SinkError> {
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
            let (next, chunk) = match sscan(&mut conn, tag, cursor).await {
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
    pub(super) async fn tombstone_keys(&self, items: &[(&str, Lsn)]) -> Result<u64, SinkError> {
        let hold = self.settings.tombstone_ms;
        let calls: Vec<_> = items
            .iter()
            .map(|&(key, lsn)| {
                let mut conn = self.conn();
                async move {
                    let _: i64 = self
                        .tombstone_set
                        .key(key)
                        .arg(hold)
                        .arg(lsn_hex(lsn))
                        .invoke_async(&mut conn)
                        .await?;
                    Ok::<u64, RedisError>(1)
                }
            })
            .collect();
        let done = concurrently(calls)
            .await
            .map_err(self.err("EVALSHA tombstone-set"))?;
        Ok(done.iter().sum())
    }

    /// Tombstones every member of a tag set (SSCAN here, TOMBSTONE_SET per
    /// member); members stay in the set, as on a single server.
    pub(super) async fn tombstone_tag(
        &self,
        tag: &str,
        lsn: Lsn,
        stats: &mut ApplyStats,
    ) -> Result<u64, SinkError> {
        let mut conn = self.conn();
        let mut cursor: u64 = 0;
        let mut seen = 0u64;
        loop {
            let (next, chunk) = match sscan(&mut conn, tag, cursor).await {
                Ok(r) => r,
                Err(e) if is_wrong_type(&e) => {
                    stats.repaired += self.repair_tag(tag, 0).await?.1;
                    return Ok(seen);
                }
                Err(e) => return Err(self.err("SSCAN")(e)),
            };
            seen += chunk.len() as u64;
            let items: Vec<(&str, Lsn)> = chunk.iter().map(|k| (k.as_str(), lsn)).collect();
            self.tombstone_keys(&items).await?;
            cursor = next;
            if cursor == 0 {
                return Ok(seen);
            }
        }
    }
}

/// One `SSCAN` step over the tag set `tag`: the next cursor and the members.
async fn sscan(
    conn: &mut ClusterConn,
    tag: &str,
    cursor: u64,
) -> Result<(u64, Vec<String>), RedisError> {
    redis::cmd("SSCAN")
        .arg(tag)
        .arg(cursor)
        .arg("COUNT")
        .arg(SSCAN_COUNT)
        .query_async(conn)
        .await
}
