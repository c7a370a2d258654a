-- cache-invalidator: VERSIONED_GET (application side, any language).
--
-- KEYS[1]  the version key, e.g. version:user:123
-- ARGV[1]  the data key's head, e.g. "user:123" (the key is <head>:v<version>:<suffix>)
-- ARGV[2]  the suffix, e.g. "profile"
-- ARGV[3]  the version a missing version key reads as (1 like the lesson, or 0)
-- returns  { version, value or false }
--
-- One round trip: GET version, then GET <head>:v<version>:<suffix>, atomically.
-- Fill with the version this returned (never a version read later): a fill of
-- data read before a bump then lands under the old version, which no reader
-- reads after the bump. The data key is derived inside the script, so it is
-- not declared in KEYS: on Redis Cluster both keys must share a hash tag
-- (e.g. version:user:{123} and user:{123}:v2:profile) and the script is not
-- Cluster-strict; on a single server it needs nothing.
local v = redis.call('GET', KEYS[1])
local version = tonumber(v)
if version == nil then
  version = tonumber(ARGV[3])
end
local data = redis.call('GET', ARGV[1] .. ':v' .. version .. ':' .. ARGV[2])
return { version, data }
