-- Change a campaign's state in one step, so no two changes can interleave.
-- KEYS[1] campaign hash. ARGV[1] action, ARGV[2] reason, ARGV[3] pause kind.
-- Actions: "pause" (a user: any open campaign), "system-pause" (an endpoint failure: only
-- a running or enqueueing campaign), "cancel", "enqueued" (the producer is done: running,
-- or completed when nothing is open). Returns {"ok" | "noop" | "refused" | "missing",
-- state after}.
local camp = KEYS[1]
local action, reason, kind = ARGV[1], ARGV[2], ARGV[3]
local state = redis.call('HGET', camp, 'state')
if not state then return {'missing', 'missing'} end
if action == 'enqueued' then
  redis.call('HSET', camp, 'enqueued_all', 1)
  if state == 'enqueueing' then redis.call('HSET', camp, 'state', 'running') end
  return {'ok', check_completed(camp, now_ms())}
end
if action == 'pause' or action == 'system-pause' then
  if state == 'paused' then return {'noop', state} end
  if action == 'system-pause' and state ~= 'running' and state ~= 'enqueueing' then
    return {'noop', state}
  end
  if state == 'cancelled' or state == 'completed' then return {'refused', state} end
  redis.call('HSET', camp, 'state', 'paused', 'reason', reason, 'pause_kind', kind)
  return {'ok', 'paused'}
end
if action == 'cancel' then
  if state == 'cancelled' then return {'noop', state} end
  if state == 'completed' then return {'refused', state} end
  redis.call('HSET', camp, 'state', 'cancelled', 'reason', reason, 'pause_kind', kind)
  return {'ok', 'cancelled'}
end
return redis.error_reply('unknown action ' .. action)
