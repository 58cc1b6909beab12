-- End one parked batch of a cancelled campaign: its open messages become "cancelled".
-- KEYS[1] campaign hash, KEYS[2] parked list, KEYS[3] not-sent set, KEYS[4..] the batch's
-- message hashes. ARGV[1] retention s, ARGV[2] the payload expected at the head of the list.
-- Idempotent: does nothing unless that payload is still first. Returns messages cancelled.
local now = now_ms()
local camp = KEYS[1]
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[2] then return 0 end
redis.call('LPOP', KEYS[2])
local n = 0
for i = 4, #KEYS do
  local key = KEYS[i]
  local old = redis.call('HGET', key, 'state') or 'queued'
  if OPEN[old] then
    move(camp, old, 'cancelled')
    redis.call('HSET', key, 'state', 'cancelled', 'reason', 'campaign cancelled',
      'updated_at', now)
    redis.call('HDEL', key, 'lease_until', 'lease_token')
    redis.call('SADD', KEYS[3], string.match(key, '[^:]*$'))
    redis.call('EXPIRE', key, tonumber(ARGV[1]))
    n = n + 1
  end
end
check_completed(camp, now)
return n
