-- One consistent read of the window. KEYS[1] quota hash; ARGV[1] now_us override,
-- ARGV[2] bucket us, ARGV[3] buckets per window. Returns {used, exhausted_until_us, why, now}
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local bucket_us, nb = tonumber(ARGV[2]), tonumber(ARGV[3])
local total = expire_buckets(key, math.floor(now / bucket_us), nb)
local until_us, why = exhausted(key, now)
return {fmt_int(total), until_us and fmt_int(until_us) or '', why or '', fmt_int(now)}
