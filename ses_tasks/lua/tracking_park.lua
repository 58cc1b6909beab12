-- Park batches of a paused campaign so that resume can hand them back to the broker.
-- KEYS[1] campaign hash, KEYS[2] parked list, KEYS[3] not-sent index set
-- ARGV[1] message key prefix, ARGV[2] retention s, ARGV[3] payload json, ARGV[4] reason,
-- ARGV[5..] message ids
-- Only parks while the campaign is still paused: a resume racing with us wins, and the
-- caller sends the messages itself. Returns the campaign state.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local camp = KEYS[1]
local cstate = redis.call('HGET', camp, 'state') or 'missing'
if cstate ~= 'paused' then return cstate end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
for i = 5, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local old = redis.call('HGET', key, 'state') or 'queued'
  if old ~= 'deferred' and old ~= 'sent' then
    redis.call('HINCRBY', camp, old, -1)
    redis.call('HINCRBY', camp, 'deferred', 1)
  end
  if old ~= 'sent' then
    redis.call('HSET', key, 'state', 'deferred', 'reason', ARGV[4], 'updated_at', now)
    redis.call('HDEL', key, 'lease_until', 'lease_token')
    redis.call('SADD', KEYS[3], ARGV[i])
    redis.call('EXPIRE', key, tonumber(ARGV[2]))
  end
end
return cstate
