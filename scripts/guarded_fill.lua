-- cache-invalidator: GUARDED_FILL (application side, any language).
--
-- KEYS[1]     the cache key to fill
-- KEYS[2..n]  tag sets to add the key to (full names, e.g. tag:user:123); may be none
-- ARGV[1]     what the reader saw at its miss: the exact tombstone string,
--             or the empty string for "the key was absent"
-- ARGV[2]     the value (must not start with the tombstone prefix)
-- ARGV[3]     the value's TTL in seconds
-- ARGV[4]     the tag sets' TTL in seconds (data TTL plus a margin); only
--             needed with tags
-- returns     1 when the value was set, 0 when the fill was refused
--
-- The value is set only if the key still holds exactly what the reader saw
-- (absent: SET NX semantics). A commit between the reader's database read and
-- this fill made the worker write a newer tombstone (or one where the key was
-- absent), so a stale fill is refused. Tag memberships are added with the
-- value, atomically; a tag set's TTL only grows (EXPIRE NX, then EXPIRE GT).
local expected = ARGV[1]
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' then
  return 0 -- a key of another type: not what the reader saw
end
if expected == '' then
  if cur then
    return 0
  end
elseif cur ~= expected then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('EXPIRE', KEYS[i], ARGV[4], 'NX')
  redis.call('EXPIRE', KEYS[i], ARGV[4], 'GT')
end
return 1
