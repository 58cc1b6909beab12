-- Extend a live worker's leases on the messages it still holds, and its batch's due time.
-- KEYS[1] campaign hash, KEYS[2] ledger due zset, KEYS[3..] message hashes
-- ARGV[1] lease ms, ARGV[2] lease token, ARGV[3] batch id ('' none)
-- Returns {campaign_state, now_ms, lost_1, ...}: 1-based positions of messages no longer
-- ours (another worker took them over); the caller must not send those.
local now = now_ms()
local lease_ms, token = tonumber(ARGV[1]), ARGV[2]
local out = {redis.call('HGET', KEYS[1], 'state') or 'missing', tostring(now)}
-- XX GT: only an entry that still exists, and never earlier than it is due (a follow-up
-- that reuses the batch id keeps its own later due time).
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], 'XX', 'GT', now + lease_ms, ARGV[3]) end
for i = 3, #KEYS do
  local rec = redis.call('HMGET', KEYS[i], 'state', 'lease_token')
  if rec[1] == 'sending' and rec[2] == token then
    redis.call('HSET', KEYS[i], 'lease_until', now + lease_ms)
  else
    -- Taken over (or already settled by whoever took it over): not ours to send.
    table.insert(out, i - 2)
  end
end
return out
