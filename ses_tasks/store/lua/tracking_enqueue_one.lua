-- Record a single (transactional) message and its ledger entry before it is published.
-- KEYS[1] standing campaign hash, KEYS[2] batch ledger hash, KEYS[3] ledger due zset,
-- KEYS[4] message hash. ARGV[1] email, ARGV[2] payload json, ARGV[3] redeliver-after ms,
-- ARGV[4] retention s
-- Returns {"new" | "exists", message state, "1" if its ledger entry is still there}: the
-- caller publishes a new message, and publishes again one still queued with its entry
-- (an earlier publish may have failed; a copy is harmless, claims are idempotent).
local now = now_ms()
local camp, key, ttl = KEYS[1], KEYS[4], tonumber(ARGV[4])
local mid = string.match(key, '[^:]*$')
if not redis.call('HGET', camp, 'state') then new_campaign(camp, now, 'running') end
local state = redis.call('HGET', key, 'state')
if state then
  return {'exists', state, tostring(redis.call('HEXISTS', KEYS[2], mid))}
end
redis.call('HSET', key, 'state', 'queued', 'email', ARGV[1], 'created_at', now,
  'updated_at', now)
redis.call('EXPIRE', key, ttl)
redis.call('HINCRBY', camp, 'total', 1)
redis.call('HINCRBY', camp, 'queued', 1)
redis.call('HSET', KEYS[2], mid, ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), mid)
return {'new', 'queued', '1'}
