-- Ask one running batch of a campaign to stop at its next chunk (see acquire).
-- KEYS[1] limiter hash; ARGV[1] now_us override, ARGV[2] campaign, ARGV[3] how long the
-- request stands (us), ARGV[4] key ttl ms.
local key = KEYS[1]
local now = server_now_us(ARGV[1])
redis.call('HSET', key, 'y:' .. ARGV[2], fmt_int(now + tonumber(ARGV[3])))
if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, tonumber(ARGV[4])) end
return 1
