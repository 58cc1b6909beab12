-- Claim messages of one batch for sending, atomically with the campaign counters.
-- KEYS[1] campaign hash, KEYS[2] not-sent set, KEYS[3] batch ledger hash, KEYS[4] ledger
-- due zset, KEYS[5..] one message hash per message (in ARGV order)
-- ARGV[1] lease ms, ARGV[2] lease token, ARGV[3] retention s, ARGV[4] "1" for the standing
-- (transactional) campaign, ARGV[5] batch id ('' for none), ARGV[6..] pairs: suppressed
-- flag ("1"/"0"), email
-- Returns {campaign_state, now_ms, decision_1, ...}; decisions are parsed in one place
-- (ses_tasks/store/claims.py): go | go:recovered | skip:<state> | busy:<ms> | cancelled
-- | suppressed | paused | skip:missing | skip:stale
local now = now_ms()
local camp = KEYS[1]
local lease_ms, token, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local standing, batch_id = ARGV[4] == '1', ARGV[5]
local cstate = redis.call('HGET', camp, 'state') or 'missing'
local out = {cstate, tostring(now)}
local n = #KEYS - 4

local function all(decision)
  for _ = 1, n do table.insert(out, decision) end
  return out
end

if cstate == 'missing' then
  if not standing then return all('skip:missing') end
  new_campaign(camp, now, 'running')
  cstate = 'running'
  out[1] = cstate
end
if batch_id ~= '' then
  -- A copy of a batch whose ledger entry is gone: every message of it is final or
  -- covered by a follow-up batch (removal and follow-ups are one script).
  if redis.call('HEXISTS', KEYS[3], batch_id) == 0 then return all('skip:stale') end
  redis.call('ZADD', KEYS[4], now + lease_ms, batch_id)
end

for i = 1, n do
  local key = KEYS[4 + i]
  local suppressed, email = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
  local mid = string.match(key, '[^:]*$')
  local rec = redis.call('HMGET', key, 'state', 'lease_until', 'lease_token')
  local old = rec[1] or 'queued'
  if standing and rec[1] == false then
    -- A single message whose record was lost with Redis: count it again.
    redis.call('HINCRBY', camp, 'total', 1)
    redis.call('HINCRBY', camp, 'queued', 1)
  end
  if FINAL[old] then
    table.insert(out, 'skip:' .. old)
  elseif old == 'sending' and rec[3] == token then
    -- Our own claim, asked again because the reply was lost: nothing changes.
    table.insert(out, 'go')
  elseif old == 'sending' and tonumber(rec[2] or '0') > now then
    table.insert(out, 'busy:' .. tostring(tonumber(rec[2]) - now))
  elseif cstate == 'cancelled' then
    move(camp, old, 'cancelled')
    redis.call('HSET', key, 'state', 'cancelled', 'email', email, 'reason', 'campaign cancelled',
      'updated_at', now)
    redis.call('HDEL', key, 'lease_until', 'lease_token')
    redis.call('SADD', KEYS[2], mid)
    redis.call('EXPIRE', key, ttl)
    table.insert(out, 'cancelled')
  elseif suppressed == '1' then
    move(camp, old, 'suppressed')
    redis.call('HSET', key, 'state', 'suppressed', 'email', email,
      'reason', 'recipient is on the suppression list', 'updated_at', now)
    redis.call('HDEL', key, 'lease_until', 'lease_token')
    redis.call('SADD', KEYS[2], mid)
    redis.call('EXPIRE', key, ttl)
    table.insert(out, 'suppressed')
  elseif cstate == 'paused' then
    table.insert(out, 'paused')
  else
    move(camp, old, 'sending')
    redis.call('HSET', key, 'state', 'sending', 'email', email, 'lease_until', now + lease_ms,
      'lease_token', token, 'updated_at', now)
    if rec[1] == false then redis.call('HSET', key, 'created_at', now) end
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
