//! The Lua scripts the sink runs with EVALSHA (reloaded on NOSCRIPT).
//!
//! All are safe to repeat: the worker delivers at least once. The tombstone
//! scripts live as files under `scripts/` (applications and other languages
//! read them there; see `docs/race-proof-fills.md`).

/// Pops up to `ARGV[1]` members of the tag set `KEYS[1]`, unlinks them, and
/// returns how many it popped. The caller repeats it until it returns fewer
/// than asked. Each call is atomic, so a key tagged concurrently is either
/// deleted now or still in the set, never dropped from the set while it lives.
/// (Unpacking at most 1000 members at a time stays far below Lua's stack limit.)
/// When the last member is popped, Redis removes the empty set itself.
pub const TAG_POP: &str = r"
local members = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
if #members > 0 then
  redis.call('UNLINK', unpack(members))
end
return #members
";

/// Bumps the version key `KEYS[1]`. A missing key becomes 2, not 1: readers
/// that read a missing version as 1 and readers that read it as 0 both see a
/// new version. INCR keeps the key's TTL.
pub const VERSION_BUMP: &str = r"
local v = redis.call('INCR', KEYS[1])
if v == 1 then
  v = redis.call('INCR', KEYS[1])
end
return v
";

/// Members popped per TAG_POP call.
pub const TAG_POP_COUNT: usize = 1000;

/// Writes tombstones (`mode = "tombstone"` keys): `KEYS` are the keys,
/// `ARGV[1]` the hold time in ms, `ARGV[i + 1]` the LSN of `KEYS[i]` as 16 hex
/// digits ([`crate::cache::tombstone::lsn_hex`]). A tombstone is replaced only
/// by a newer one; anything else is replaced. Returns how many were written.
pub const TOMBSTONE_SET: &str = include_str!("../../scripts/tombstone_set.lua");

/// Tombstones every member of a tag set (`mode = "tombstone"` tags) in SSCAN
/// steps: `KEYS[1]` the set, `ARGV` cursor, count, LSN (16 hex digits), hold
/// ms; returns `{next cursor, members seen}`. Members stay in the set.
pub const TAG_TOMBSTONE: &str = include_str!("../../scripts/tag_tombstone.lua");

/// Keys per TOMBSTONE_SET call.
pub const TOMBSTONE_CHUNK: usize = 500;
