-- Claim a batch of messages for sending, atomically with the campaign counters.
-- KEYS[1] campaign hash, KEYS[2] not-sent index set
-- ARGV[1] message key prefix, ARGV[2] lease ms, ARGV[3] lease token, ARGV[4] retention s,
-- ARGV[5] "standing" ("1" for the transactional campaign, which is recreated if lost),
-- ARGV[6..] triples: message id, suppressed flag ("1"/"0"), email
-- Returns {campaign_state, now_ms, result_1, ...} where a result is
--   "go" | "go:recovered" | "skip:<state>" | "busy:<ms left>" | "cancelled" | "suppressed"
--   | "paused" | "skip:missing" (the campaign record is gone: Redis lost it, or it expired;
--   nothing is written and nothing is sent, rather than sending blind)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local camp = KEYS[1]
local cstate = redis.call('HGET', camp, 'state') or 'missing'
local prefix, lease_ms, token, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local standing = ARGV[5] == '1'
local final = {sent=true, failed=true, suppressed=true, unknown=true, cancelled=true}
local out = {cstate, tostring(now)}

if cstate == 'missing' then
  if not standing then
    for i = 6, #ARGV, 3 do table.insert(out, 'skip:missing') end
    return out
  end
  redis.call('HSET', camp, 'id', string.match(camp, '{(.*)}') or '', 'state', 'running',
    'total', 0, 'created_at', now, 'enqueued_all', 0)
  cstate = 'running'
end

local function move(key, old, new)
  if old ~= new then
    redis.call('HINCRBY', camp, old, -1)
    redis.call('HINCRBY', camp, new, 1)
  end
end

for i = 6, #ARGV, 3 do
  local mid, suppressed, email = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = prefix .. mid
  local rec = redis.call('HMGET', key, 'state', 'lease_until', 'lease_token')
  local old = rec[1] or 'queued'
  if standing and rec[1] == false then
    -- A single message whose record was lost with Redis: count it again.
    redis.call('HINCRBY', camp, 'total', 1)
    redis.call('HINCRBY', camp, 'queued', 1)
  end
  if final[old] then
    table.insert(out, 'skip:' .. old)
  elseif old == 'sending' and tonumber(rec[2] or '0') > now and rec[3] ~= token then
    table.insert(out, 'busy:' .. tostring(tonumber(rec[2]) - now))
  elseif cstate == 'cancelled' then
    move(key, old, 'cancelled')
    redis.call('HSET', key, 'state', 'cancelled', 'email', email, 'reason', 'campaign cancelled',
      'updated_at', now)
    redis.call('SADD', KEYS[2], mid)
    redis.call('EXPIRE', key, ttl)
    table.insert(out, 'cancelled')
  elseif suppressed == '1' then
    move(key, old, 'suppressed')
    redis.call('HSET', key, 'state', 'suppressed', 'email', email,
      'reason', 'recipient is on the suppression list', 'updated_at', now)
    redis.call('SADD', KEYS[2], mid)
    redis.call('EXPIRE', key, ttl)
    table.insert(out, 'suppressed')
  elseif cstate == 'paused' then
    table.insert(out, 'paused')
  else
    move(key, old, 'sending')
    redis.call('HSET', key, 'state', 'sending', 'email', email, 'lease_until', now + lease_ms,
      'lease_token', token, 'updated_at', now)
    if rec[1] == false then
      redis.call('HSET', key, 'created_at', now)
    end
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('EXPIRE', key, ttl)
    if old == 'sending' then
      redis.call('HSET', key, 'recovered', 1)
      table.insert(out, 'go:recovered')
    else
      table.insert(out, 'go')
    end
  end
end
return out
