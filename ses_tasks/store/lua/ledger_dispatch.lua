-- The dispatcher hands a campaign's stored batches to the broker a few at a time.
-- KEYS[1] campaign hash, KEYS[2] batch ledger hash, KEYS[3] ledger due zset, KEYS[4]
-- backlog zset (batch id -> first seq), KEYS[5] dispatched zset (batch id -> when)
-- ARGV[1] batches to take (0: only count), ARGV[2] ms after which the sweeper republishes
-- a taken batch nobody claimed (its publish was lost, or the dispatcher died), ARGV[3]
-- retention s
-- A dispatched batch counts against the campaign's credits until it leaves the ledger
-- (settled or parked); settled ones are pruned here, so credits need no other bookkeeping.
-- A campaign scheduled with send_at hands out nothing before then (by this server's
-- clock), unless it is cancelled: its batches are then taken to record them cancelled.
-- Returns {campaign_state, in_flight, backlog, weight, open, profile, starts_in_ms (0 once
-- it may send), id_1, payload_1, ...}.
local now = now_ms()
local c = redis.call('HMGET', KEYS[1], 'state', 'weight', 'profile', 'send_at')
local cstate, weight, profile = c[1] or 'missing', c[2] or '1', c[3] or ''
local starts_in = 0
if c[4] and cstate ~= 'cancelled' then starts_in = math.max(0, (tonumber(c[4]) or 0) - now) end
if cstate == 'missing' then
  -- Its record is gone (expired, or Redis lost it): claims would send nothing.
  redis.call('DEL', KEYS[4], KEYS[5])
  return {cstate, 0, 0, weight, 0, profile, 0}
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if redis.call('HEXISTS', KEYS[2], id) == 0 then redis.call('ZREM', KEYS[5], id) end
end
local out = {cstate, 0, 0, weight, 0, profile, starts_in}
local n = tonumber(ARGV[1])
if n > 0 and cstate ~= 'paused' and starts_in == 0 then
  local taken = redis.call('ZPOPMIN', KEYS[4], n)
  for i = 1, #taken, 2 do
    local id = taken[i]
    local payload = redis.call('HGET', KEYS[2], id)
    if payload then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id)
      redis.call('ZADD', KEYS[5], now, id)
      table.insert(out, id)
      table.insert(out, payload)
    end
  end
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[3]))
end
out[2] = redis.call('ZCARD', KEYS[5])
out[3] = redis.call('ZCARD', KEYS[4])
local open = 0
for name, _ in pairs(OPEN) do open = open + tonumber(redis.call('HGET', KEYS[1], name) or '0') end
out[5] = open
return out
