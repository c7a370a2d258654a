//! The Lua scripts the sink runs with EVALSHA (reloaded on NOSCRIPT).
//!
//! All are safe to repeat: the worker delivers at least once. The tombstone
//! scripts live as files under `scripts/` (applications and other languages
//! read them there; see `docs/race-proof-fills.md`).

/// Invalidates the tag sets `KEYS[..]` with one call: for each set in turn,
/// pops members (at most `ARGV[1]` in the whole call), unlinks them, and moves
/// on. Returns `{popped, again, wrong}`: how many members it popped, the
/// 1-based indexes of the sets that may hold more (the budget ran out: call
/// again with them), and of the keys that are not sets (WRONGTYPE: the caller
/// unlinks them). Each call is atomic, so a key tagged concurrently is either
/// deleted now or still in its set, never dropped from the set while it lives.
/// The budget keeps one call short (Redis runs nothing else meanwhile) and the
/// unpacked member list far below Lua's stack limit. When the last member is
/// popped, Redis removes the empty set itself.
pub const TAG_POP: &str = r"
local budget = tonumber(ARGV[1])
local popped = 0
local again = {}
local wrong = {}
for i, tag in ipairs(KEYS) do
  if budget <= 0 then
    again[#again + 1] = i
  else
    local members = redis.pcall('SPOP', tag, budget)
    if members.err then
      wrong[#wrong + 1] = i
    elseif #members > 0 then
      redis.call('UNLINK', unpack(members))
      popped = popped + #members
      budget = budget - #members
      if budget <= 0 then
        again[#again + 1] = i
      end
    end
  end
end
return {popped, again, wrong}
";

/// Bumps the version key `KEYS[1]`. A missing key becomes 2, not 1: readers
/// that read a missing version as 1 and readers that read it as 0 both see a
/// new version. INCR keeps the key's TTL. The cluster sink runs it per key;
/// the single-server sink sends `SET key 2 NX`, then `INCR key` for the keys
/// that existed (the same result, cheaper for Redis than a script call).
pub const VERSION_BUMP: &str = r"
local v = redis.call('INCR', KEYS[1])
if v == 1 then
  v = redis.call('INCR', KEYS[1])
end
return v
";

/// Tag sets per TAG_POP call. Each EVALSHA has a fixed cost in Redis (on W2,
/// one call per tag set and per version key was 0.65 s of Redis CPU for
/// 100,000 transactions; batched, 0.4 s).
pub const SCRIPT_KEYS_CHUNK: usize = 100;

/// Members popped per TAG_POP call (all of its sets together).
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

/// Sets pre-warmed values (`refresh` rules), each only if Redis holds no
/// newer version of its key: `KEYS` are the keys, `ARGV` per key the version
/// ([`crate::plan::RefreshVersion`]), TTL seconds (0: none), format, number
/// of value arguments and the values. Returns how many keys were set.
pub const REFRESH_SET: &str = include_str!("../../scripts/refresh_set.lua");

/// Keys per TOMBSTONE_SET call.
pub const TOMBSTONE_CHUNK: usize = 500;
