-- The dispatcher's view of who sends: each campaign's share of the rate (see acquire).
-- KEYS[1] limiter hash; ARGV[1] now_us override, ARGV[2] key ttl ms, then pairs
-- campaign, share. Fields of campaigns no longer sending are dropped, and yield requests
-- past their deadline.
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local keep = {}
for i = 3, #ARGV, 2 do keep[ARGV[i]] = ARGV[i + 1] end
for _, name in ipairs(redis.call('HKEYS', key)) do
  local kind, campaign = string.sub(name, 1, 2), string.sub(name, 3)
  if (kind == 's:' or kind == 'c:') and keep[campaign] == nil then
    redis.call('HDEL', key, name)
  elseif kind == 'y:' and tonumber(redis.call('HGET', key, name) or '0') <= now then
    redis.call('HDEL', key, name)  -- a yield request nobody answered in time
  end
end
for campaign, share in pairs(keep) do redis.call('HSET', key, 's:' .. campaign, share) end
redis.call('HSET', key, 'sat', fmt_int(now))
if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, tonumber(ARGV[2])) end
return #ARGV / 2 - 1
