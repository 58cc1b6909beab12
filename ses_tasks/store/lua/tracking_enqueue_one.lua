-- Record a single (transactional) message and its ledger entry before it is published.
-- KEYS[1] standing campaign hash, KEYS[2] batch ledger hash, KEYS[3] ledger due zset,
-- KEYS[4] message hash. ARGV[1] email, ARGV[2] payload json, ARGV[3] redeliver-after ms,
-- ARGV[4] retention s, ARGV[5] send_at (Unix ms; '0' or absent: now)
-- A message with a send_at still ahead is not published by the caller: its entry is due
-- at send_at (the scheduler publishes it then; the sweeper if the scheduler missed it),
-- its record says `send_at`, and it and the shared ledger keys live until send_at plus
-- the retention.
-- Returns {"new" | "exists", message state, "1" if its ledger entry is still there,
-- send_at ms if it is still ahead else ""}: the caller publishes a new message that is
-- not scheduled, and publishes again one still queued with its entry and not scheduled
-- (an earlier publish may have failed; a copy is harmless, claims are idempotent).
local now = now_ms()
local camp, key, ttl = KEYS[1], KEYS[4], tonumber(ARGV[4])
local mid = string.match(key, '[^:]*$')
local send_at = tonumber(ARGV[5] or '0') or 0
if not redis.call('HGET', camp, 'state') then new_campaign(camp, now, 'running') end
local rec = redis.call('HMGET', key, 'state', 'send_at')
if rec[1] then
  local waiting = ''
  if rec[2] and tonumber(rec[2]) > now then waiting = rec[2] end
  return {'exists', rec[1], tostring(redis.call('HEXISTS', KEYS[2], mid)), waiting}
end
local due = now + tonumber(ARGV[3])
local waiting = ''
if send_at > now then
  due = send_at
  waiting = tostring(send_at)
  ttl = ttl + math.ceil((send_at - now) / 1000)
end
redis.call('HSET', key, 'state', 'queued', 'email', ARGV[1], 'created_at', now,
  'updated_at', now)
if waiting ~= '' then redis.call('HSET', key, 'send_at', send_at) end
redis.call('EXPIRE', key, ttl)
redis.call('HINCRBY', camp, 'total', 1)
redis.call('HINCRBY', camp, 'queued', 1)
redis.call('HSET', KEYS[2], mid, ARGV[2])
redis.call('ZADD', KEYS[3], due, mid)
extend_ttl(KEYS[2], ttl)
extend_ttl(KEYS[3], ttl)
return {'new', 'queued', '1', waiting}
