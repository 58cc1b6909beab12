-- Resume a paused campaign: set it running and take its parked batches, atomically.
-- KEYS[1] campaign hash, KEYS[2] parked list. Returns {old_state, payload...}.
local cstate = redis.call('HGET', KEYS[1], 'state') or 'missing'
if cstate ~= 'paused' then return {cstate} end
local running = redis.call('HGET', KEYS[1], 'enqueued_all') == '1' and 'running' or 'enqueueing'
redis.call('HSET', KEYS[1], 'state', running, 'reason', '')
local out = {cstate}
local items = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
for _, v in ipairs(items) do table.insert(out, v) end
return out
