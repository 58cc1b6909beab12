-- The sweeper takes a campaign's ledger entries that are past due (a worker died holding
-- them, or their publish was lost), pushes their due time out and counts them swept.
-- KEYS[1] campaign hash, KEYS[2] batch ledger hash, KEYS[3] ledger due zset
-- ARGV[1] limit, ARGV[2] redeliver-after ms, ARGV[3] "1" for the standing campaign
-- Returns {campaign_state, batch_id_1, payload_1, ...}. Entries of a campaign whose record
-- is gone are dropped (their claims would send nothing).
local now = now_ms()
local cstate = redis.call('HGET', KEYS[1], 'state') or 'missing'
local out = {cstate}
if cstate == 'missing' and ARGV[3] ~= '1' then
  redis.call('DEL', KEYS[2], KEYS[3])
  return out
end
if cstate == 'paused' then return out end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local n = 0
for _, id in ipairs(ids) do
  local payload = redis.call('HGET', KEYS[2], id)
  if payload then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id)
    table.insert(out, id)
    table.insert(out, payload)
    n = n + 1
  else
    redis.call('ZREM', KEYS[3], id)
  end
end
if n > 0 and cstate ~= 'missing' then redis.call('HINCRBY', KEYS[1], 'swept', n) end
return out
