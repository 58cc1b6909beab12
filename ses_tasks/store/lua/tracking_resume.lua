-- Resume a paused campaign: set it running and move its parked batches into the ledger.
-- KEYS[1] campaign hash, KEYS[2] parked list, KEYS[3] batch ledger hash, KEYS[4] due zset
-- ARGV[1] publish grace ms, ARGV[2] retention s
-- Returns {old_state, now_ms, batch_id_1, payload_1, ...}: the caller publishes them; the
-- sweeper republishes any whose publish is lost.
local now = now_ms()
local cstate = redis.call('HGET', KEYS[1], 'state') or 'missing'
if cstate ~= 'paused' then return {cstate, tostring(now)} end
local running = redis.call('HGET', KEYS[1], 'enqueued_all') == '1' and 'running' or 'enqueueing'
redis.call('HSET', KEYS[1], 'state', running, 'reason', '')
local out = {cstate, tostring(now)}
local items = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
for i, v in ipairs(items) do
  local id = 'r' .. now .. '-' .. i
  redis.call('HSET', KEYS[3], id, v)
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[1]), id)
  table.insert(out, id)
  table.insert(out, v)
end
if #items > 0 then
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[2]))
end
return out
