-- cache-invalidator: TOMBSTONE_SET (run by the worker for mode = "tombstone" keys).
--
-- KEYS[i]     a key to tombstone
-- ARGV[1]     hold time in milliseconds (PX)
-- ARGV[i + 1] the commit LSN for KEYS[i], as 16 uppercase hexadecimal digits
-- returns     how many tombstones were written
--
-- A tombstone is the string "\0cache-invalidator:tombstone:" followed by the
-- commit LSN as 16 hexadecimal digits (docs/race-proof-fills.md). Any value
-- that is not a tombstone (application data, or a key of another type) is
-- replaced, except a value a `refresh` rule set at a higher commit LSN (it
-- is newer than this invalidation; docs/pre-warm.md); a tombstone is
-- replaced only by one with a higher LSN, so a repeated or late older
-- invalidation never shortens a newer one. Safe to repeat.
local P = '\0cache-invalidator:tombstone:'

local function lsn_of(v)
  if type(v) ~= 'string' or #v ~= #P + 16 or string.sub(v, 1, #P) ~= P then
    return nil
  end
  local hi = tonumber(string.sub(v, #P + 1, #P + 8), 16)
  local lo = tonumber(string.sub(v, #P + 9, #P + 16), 16)
  if hi == nil or lo == nil then
    return nil
  end
  return hi, lo
end

-- The commit LSN (16 hex digits) of a value set by a `refresh` rule
-- (REFRESH_SET, docs/pre-warm.md), or nil. `cur` is what GET returned.
local function refreshed_lsn(key, cur)
  if type(cur) == 'string' then
    if string.sub(cur, 1, 9) == '{"_lsn":"' and string.sub(cur, 35, 35) == '"' then
      return string.sub(cur, 10, 25)
    end
  elseif type(cur) == 'table' and redis.call('TYPE', key).ok == 'hash' then
    local v = redis.call('HGET', key, '_lsn')
    if v and #v == 25 then
      return string.sub(v, 1, 16)
    end
  end
  return nil
end

local written = 0
for i, key in ipairs(KEYS) do
  local marker = P .. ARGV[i + 1]
  local nhi, nlo = lsn_of(marker)
  if nhi == nil then
    return redis.error_reply('tombstone_set: ARGV[' .. (i + 1) .. '] is not 16 hexadecimal digits')
  end
  local cur = redis.pcall('GET', key)
  local chi, clo = lsn_of(cur)
  local refreshed = refreshed_lsn(key, cur)
  if refreshed ~= nil and refreshed > ARGV[i + 1] then
    -- a refreshed value of a later commit: newer than this tombstone, kept
  elseif chi == nil or chi < nhi or (chi == nhi and clo < nlo) then
    redis.call('SET', key, marker, 'PX', ARGV[1])
    written = written + 1
  end
end
return written
