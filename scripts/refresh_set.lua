-- cache-invalidator: REFRESH_SET (run by the worker for `refresh` rules).
--
-- KEYS[i]  a key to set to a row's new image
-- ARGV     per key, in order: the version, the TTL in seconds ("0": none),
--          the format ("json" or "hash"), the number n of value arguments,
--          then the n value arguments (json: the JSON text; hash: field,
--          value, field, value, ...)
-- returns  how many keys were set (the others hold a newer version)
--
-- A version is the commit LSN as 16 upper-case hexadecimal digits, a dot,
-- and the change's position in its transaction as 8 (docs/pre-warm.md):
-- equal-length strings, so they compare as strings in commit order. The
-- version sits in the value itself: first member "_lsn" of the JSON object,
-- field "_lsn" of the hash. A key is set only if it holds no newer version:
--   - a refreshed value (JSON or hash) with an equal or higher version: kept
--     (a replay of an already applied transaction changes nothing);
--   - a tombstone (docs/race-proof-fills.md) with a higher commit LSN: kept;
--     one with a lower or equal LSN is replaced (the value is the row as of
--     that commit, what the tombstone waited for);
--   - anything else (absent, application data, another type): replaced.
-- Safe to repeat.
local TP = '\0cache-invalidator:tombstone:'
local JP = '{"_lsn":"'
local VLEN = 25

local function current_version(key)
  local t = redis.call('TYPE', key).ok
  if t == 'string' then
    local head = redis.call('GETRANGE', key, 0, 63)
    if #head == #TP + 16 and string.sub(head, 1, #TP) == TP then
      return 'tombstone', string.sub(head, #TP + 1)
    end
    if string.sub(head, 1, #JP) == JP and string.sub(head, #JP + VLEN + 1, #JP + VLEN + 1) == '"' then
      return 'value', string.sub(head, #JP + 1, #JP + VLEN)
    end
  elseif t == 'hash' then
    local v = redis.call('HGET', key, '_lsn')
    if v and #v == VLEN then
      return 'value', v
    end
  end
  return nil, nil
end

local set = 0
local a = 1
for _, key in ipairs(KEYS) do
  local version = ARGV[a]
  local ttl = tonumber(ARGV[a + 1])
  local format = ARGV[a + 2]
  local n = tonumber(ARGV[a + 3])
  if version == nil or #version ~= VLEN or ttl == nil or n == nil then
    return redis.error_reply('refresh_set: malformed arguments at ARGV[' .. a .. ']')
  end
  local first = a + 4
  a = first + n
  local kind, cur = current_version(key)
  local keep = (kind == 'value' and cur >= version)
    or (kind == 'tombstone' and cur > string.sub(version, 1, 16))
  if not keep then
    if format == 'json' then
      if ttl > 0 then
        redis.call('SET', key, ARGV[first], 'EX', ttl)
      else
        redis.call('SET', key, ARGV[first])
      end
    else
      redis.call('UNLINK', key)
      redis.call('HSET', key, unpack(ARGV, first, first + n - 1))
      if ttl > 0 then
        redis.call('EXPIRE', key, ttl)
      end
    end
    set = set + 1
  end
end
return set
