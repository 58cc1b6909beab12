-- One consistent read of the limiter (applying due recovery steps, like acquire does).
-- KEYS[1] limiter hash, KEYS[2] its change log; ARGV[1] now_us override, ARGV[2] recovery step,
-- ARGV[3] recovery interval us, ARGV[4] configured rate per s and ARGV[5] account (for
-- the change log, KEYS[2]).
-- Returns {now, f, changed, old_f, tat, reason, at, prev}
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local f, changed, old_f = refresh_factor(key, now, tonumber(ARGV[2]), tonumber(ARGV[3]),
  change_log(KEYS[2], tonumber(ARGV[4]), ARGV[5]))
local st = redis.call('HMGET', key, 'tat', 'reason', 'at', 'prev')
return {fmt_int(now), fmt(f), changed, fmt(old_f), st[1] or '', st[2] or '', st[3] or '',
  st[4] or ''}
