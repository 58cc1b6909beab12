-- Shared prelude of the ratelimit_*.lua scripts (ses_tasks/ratelimit.py prepends it).
-- Times are integer microseconds of the Redis server clock, so every worker, on every
-- machine, sees one clock. Redis >= 5 replicates a script's effects, not the script, so
-- reading TIME before writing is allowed (always on in Redis 7; asked for on 5 and 6).
if redis.replicate_commands then pcall(redis.replicate_commands) end

local function server_now_us(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(x) return string.format('%.17g', x) end
local function fmt_int(x) return string.format('%.0f', x) end

-- The last rate changes, for people (the dashboard's limits page): a list of JSON objects,
-- oldest first, capped at CHANGES_KEPT, written by the script that made the change.
-- `log` is {key, configured rate, account} or nil (the caller gave no KEYS[2]).
local CHANGES_KEPT = 50
local CHANGES_TTL_MS = 7 * 86400 * 1000
local function change_log(key, rate, account)
  if key == nil or key == '' or rate == nil then return nil end
  return {key, rate, account or ''}
end
local function record_change(log, now, old_f, new_f, why)
  if log == nil then return end
  local rate = log[2]
  redis.call('RPUSH', log[1], string.format(
    '{"at_us":%.0f,"account":"%s","old_rate":%s,"new_rate":%s,"why":"%s"}',
    now, log[3], fmt(rate * old_f), fmt(rate * new_f), why))
  local n = redis.call('LLEN', log[1])
  while n > CHANGES_KEPT do
    redis.call('LPOP', log[1])
    n = n - 1
  end
  redis.call('PEXPIRE', log[1], CHANGES_TTL_MS)
end

-- The fleet's effective rate is configured_rate * f, 0 < f <= 1 (AIMD factor).
-- Additive recovery is lazy: each whole step interval since the last change adds `step`
-- to f. Returns f, changed ('1'/'0'), f before this call.
local function refresh_factor(key, now, step, interval_us, log)
  local st = redis.call('HMGET', key, 'f', 'fchg')
  local f = tonumber(st[1]) or 1
  local fchg = tonumber(st[2])
  if f >= 1 or step <= 0 or fchg == nil then return f, '0', f end
  local k = math.floor((now - fchg) / interval_us)
  if k < 1 then return f, '0', f end
  local old = f
  f = math.min(1, f + k * step)
  redis.call('HSET', key, 'f', fmt(f), 'fchg', fmt_int(fchg + k * interval_us),
    'reason', 'recover', 'prev', fmt(old), 'at', fmt_int(now))
  record_change(log, now, old, f, 'recover')
  return f, '1', old
end

-- Shares older than this are ignored: their dispatcher died, so no campaign is held back.
local SHARES_FRESH_US = 10000000
