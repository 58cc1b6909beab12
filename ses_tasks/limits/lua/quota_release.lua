-- Give back up to n recipients that were counted but never reached SES (newest first).
-- KEYS[1] quota hash; ARGV[1] now_us override, ARGV[2] n, ARGV[3] bucket us,
-- ARGV[4] buckets per window. Returns {released, used}
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local n = tonumber(ARGV[2])
local bucket_us, nb = tonumber(ARGV[3]), tonumber(ARGV[4])
local total, lo, hi = expire_buckets(key, math.floor(now / bucket_us), nb)
if lo == nil then return {'0', '0'} end
local released = 0
local i = hi
while i >= lo and released < n do
  local c = tonumber(redis.call('HGET', key, bucket(i))) or 0
  local take = math.min(c, n - released)
  if take > 0 then
    if take == c then redis.call('HDEL', key, bucket(i))
    else redis.call('HINCRBY', key, bucket(i), -take) end
    released = released + take
  end
  i = i - 1
end
total = total - released
if total <= 0 then redis.call('HDEL', key, 'total', 'lo', 'hi')
else redis.call('HSET', key, 'total', fmt_int(total)) end
return {fmt_int(released), fmt_int(math.max(0, total))}
