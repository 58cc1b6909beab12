-- SES answered "454 Maximum sending rate exceeded": multiply the fleet's rate factor by
-- ARGV[2], not below ARGV[3], at most once per ARGV[4] us (many workers see the same 454
-- burst; one decrease is the right answer to it).
-- KEYS[1] limiter hash, KEYS[2] its change log; ARGV[1] now_us override, ARGV[5] recovery
-- step, ARGV[6] recovery interval us, ARGV[7] key ttl ms, ARGV[8] configured rate per s and
-- ARGV[9] account (for the change log).
-- Returns {changed, old_f, f, recovered, f before recovery}
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local factor, floor, guard = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local log = change_log(KEYS[2], tonumber(ARGV[8]), ARGV[9])
local f, recovered, pre = refresh_factor(key, now, tonumber(ARGV[5]), tonumber(ARGV[6]), log)
local thr = tonumber(redis.call('HGET', key, 'thr'))
local changed = '0'
local old = f
if thr == nil or now - thr >= guard then
  local new = math.max(floor, f * factor)
  redis.call('HSET', key, 'thr', fmt_int(now))
  if new < f then
    redis.call('HSET', key, 'f', fmt(new), 'fchg', fmt_int(now), 'reason', 'throttle',
      'prev', fmt(f), 'at', fmt_int(now))
    record_change(log, now, f, new, 'throttle')
    f = new
    changed = '1'
  end
end
local tat = tonumber(redis.call('HGET', key, 'tat')) or now
redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[7]) + math.max(0, tat - now) / 1000))
return {changed, fmt(old), fmt(f), recovered, fmt(pre)}
