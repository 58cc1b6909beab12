-- Atomic check-and-add of n recipients against the rolling window.
-- KEYS[1] quota hash; ARGV[1] now_us override, ARGV[2] n, ARGV[3] limit (-1 = none),
-- ARGV[4] bucket us, ARGV[5] buckets per window, ARGV[6] key ttl ms
-- Returns {granted ('1'/'0'), used, retry_after_us (-1 = never), why}
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local n, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket_us, nb = tonumber(ARGV[4]), tonumber(ARGV[5])
local cur = math.floor(now / bucket_us)
local total, lo, hi = expire_buckets(key, cur, nb)
local until_us, why = exhausted(key, now)
if until_us then return {'0', fmt_int(total), fmt_int(until_us - now), why} end
if limit >= 0 and total + n > limit then
  local retry = -1
  if n <= limit then retry = time_to_free(key, total + n - limit, lo, hi, nb, bucket_us, now) end
  return {'0', fmt_int(total), fmt_int(retry), ''}
end
redis.call('HINCRBY', key, bucket(cur), n)
total = total + n
redis.call('HSET', key, 'total', fmt_int(total), 'lo', fmt_int(lo or cur), 'hi', fmt_int(cur))
redis.call('PEXPIRE', key, tonumber(ARGV[6]))
return {'1', fmt_int(total), '0', ''}
