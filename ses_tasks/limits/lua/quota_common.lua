-- Shared prelude of the quota_*.lua scripts (ses_tasks/quota.py prepends it).
-- One hash per account: 'total' (recipients in the window), 'lo'/'hi' (oldest/newest
-- bucket index that may hold a count), 'b<index>' (recipients counted in that bucket),
-- 'exh' (exhausted until, us), 'why' (what SES said). A bucket covers
-- [index * bucket_us, (index + 1) * bucket_us) of server time and counts until the whole
-- bucket is older than the window, so the window is never shorter than SES's.
if redis.replicate_commands then pcall(redis.replicate_commands) end

local function server_now_us(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt_int(x) return string.format('%.0f', x) end
local function bucket(i) return 'b' .. fmt_int(i) end

-- Drop buckets that left the window (at most nb + 1 of them, however long the key was
-- idle) and return total, lo, hi.
local function expire_buckets(key, cur, nb)
  local st = redis.call('HMGET', key, 'total', 'lo', 'hi')
  local total = tonumber(st[1]) or 0
  local lo, hi = tonumber(st[2]), tonumber(st[3])
  local first_live = cur - nb
  if lo == nil or hi == nil then return 0, nil, nil end
  if lo >= first_live then return total, lo, hi end
  for i = lo, math.min(hi, first_live - 1) do
    local c = tonumber(redis.call('HGET', key, bucket(i)))
    if c then
      total = total - c
      redis.call('HDEL', key, bucket(i))
    end
  end
  if hi < first_live or total <= 0 then
    redis.call('HDEL', key, 'total', 'lo', 'hi')
    return 0, nil, nil
  end
  redis.call('HSET', key, 'total', fmt_int(total), 'lo', fmt_int(first_live))
  return total, first_live, hi
end

-- Microseconds from now until `need` recipients have left the window (-1: never).
local function time_to_free(key, need, lo, hi, nb, bucket_us, now)
  if lo == nil then return -1 end
  local freed = 0
  for i = lo, hi do
    freed = freed + (tonumber(redis.call('HGET', key, bucket(i))) or 0)
    if freed >= need then return math.max(0, (i + nb + 1) * bucket_us - now) end
  end
  return -1
end

-- The exhausted mark, cleared once it is in the past. Returns until_us or nil, reason.
local function exhausted(key, now)
  local st = redis.call('HMGET', key, 'exh', 'why')
  local until_us = tonumber(st[1])
  if until_us == nil then return nil, nil end
  if until_us <= now then
    redis.call('HDEL', key, 'exh', 'why')
    return nil, nil
  end
  return until_us, st[2] or ''
end
