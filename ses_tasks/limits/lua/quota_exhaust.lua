-- SES said "Daily message quota exceeded": stop the account until capacity frees.
-- KEYS[1] quota hash; ARGV[1] now_us override, ARGV[2] retry after us (-1 = estimate:
-- until our oldest counted bucket leaves the window, or one bucket if we counted none),
-- ARGV[3] reason, ARGV[4] bucket us, ARGV[5] buckets per window, ARGV[6] key ttl ms.
-- An earlier, longer mark is kept with its reason. Returns {until_us, now_us}
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local retry = tonumber(ARGV[2])
local bucket_us, nb = tonumber(ARGV[4]), tonumber(ARGV[5])
local total, lo, hi = expire_buckets(key, math.floor(now / bucket_us), nb)
if retry < 0 then
  retry = time_to_free(key, 1, lo, hi, nb, bucket_us, now)
  if retry <= 0 then retry = bucket_us end
end
local until_us = now + retry
local prev = exhausted(key, now)
if prev and prev >= until_us then
  until_us = prev
else
  redis.call('HSET', key, 'exh', fmt_int(until_us), 'why', ARGV[3])
end
local ttl = math.max(tonumber(ARGV[6]), math.ceil((until_us - now) / 1000) + 1000)
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return {fmt_int(until_us), fmt_int(now)}
