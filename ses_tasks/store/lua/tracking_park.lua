-- Park messages of a paused campaign so that resume can hand them back to the broker.
-- KEYS[1] campaign hash, KEYS[2] parked list, KEYS[3] not-sent set, KEYS[4..] message hashes
-- ARGV[1] retention s, ARGV[2] payload json, ARGV[3] reason, ARGV[4] lease token
-- Parks only while the campaign is paused (a resume racing with us wins, and the caller
-- hands the messages back instead), and moves only open messages that are not held by
-- another worker. Returns the campaign state.
local now = now_ms()
local camp = KEYS[1]
local ttl, token = tonumber(ARGV[1]), ARGV[4]
local cstate = redis.call('HGET', camp, 'state') or 'missing'
if cstate ~= 'paused' then return cstate end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ttl)
for i = 4, #KEYS do
  local key = KEYS[i]
  local rec = redis.call('HMGET', key, 'state', 'lease_token')
  local old = rec[1] or 'queued'
  local theirs = old == 'sending' and rec[2] and rec[2] ~= token
  if OPEN[old] and not theirs then
    move(camp, old, 'deferred')
    redis.call('HSET', key, 'state', 'deferred', 'reason', ARGV[3], 'updated_at', now)
    if rec[1] == false then redis.call('HSET', key, 'created_at', now) end
    redis.call('HDEL', key, 'lease_until', 'lease_token')
    redis.call('SADD', KEYS[3], string.match(key, '[^:]*$'))
    redis.call('EXPIRE', key, ttl)
  end
end
return cstate
