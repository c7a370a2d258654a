-- cache-invalidator: TAG_TOMBSTONE (run by the worker for tags of mode = "tombstone" rules).
--
-- KEYS[1]  the tag set (e.g. tag:user:123)
-- ARGV[1]  SSCAN cursor ("0" to start)
-- ARGV[2]  SSCAN COUNT hint
-- ARGV[3]  the commit LSN, as 16 uppercase hexadecimal digits
-- ARGV[4]  hold time in milliseconds (PX)
-- returns  { next cursor (string, "0" when done), members seen }
--
-- Every member gets a tombstone (same rules as TOMBSTONE_SET: a newer
-- tombstone, or a value refreshed at a higher commit LSN, is never replaced
-- by an older tombstone). Unlike TAG_POP, members stay
-- in the set: a reader that missed on a tombstoned member and fills it later
-- must still be refused if the tag is invalidated again meanwhile, so the
-- worker must still find the member then. The set shrinks by expiring (the
-- fill helpers give it the data TTL plus a margin, a TTL that only grows).
-- The caller loops until the cursor is "0"; each call is atomic and safe to
-- repeat, and SSCAN returns every member present for the whole loop.
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

local marker = P .. ARGV[3]
local nhi, nlo = lsn_of(marker)
if nhi == nil then
  return redis.error_reply('tag_tombstone: ARGV[3] is not 16 hexadecimal digits')
end
local res = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local members = res[2]
for _, key in ipairs(members) do
  local cur = redis.pcall('GET', key)
  local chi, clo = lsn_of(cur)
  local refreshed = refreshed_lsn(key, cur)
  if refreshed ~= nil and refreshed > ARGV[3] then
    -- a refreshed value of a later commit: newer than this tombstone, kept
  elseif chi == nil or chi < nhi or (chi == nhi and clo < nlo) then
    redis.call('SET', key, marker, 'PX', ARGV[4])
  end
end
return { res[1], #members }
