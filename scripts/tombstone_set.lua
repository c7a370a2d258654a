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
-- replaced; a tombstone is replaced only by one with a higher LSN, so a
-- repeated or late older invalidation never shortens a newer one. Safe to repeat.
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

local written = 0
for i, key in ipairs(KEYS) do
  local marker = P .. ARGV[i + 1]
  local nhi, nlo = lsn_of(marker)
  if nhi == nil then
    return redis.error_reply('tombstone_set: ARGV[' .. (i + 1) .. '] is not 16 hexadecimal digits')
  end
  local cur = redis.pcall('GET', key)
  local chi, clo = lsn_of(cur)
  if chi == nil or chi < nhi or (chi == nhi and clo < nlo) then
    redis.call('SET', key, marker, 'PX', ARGV[1])
    written = written + 1
  end
end
return written
