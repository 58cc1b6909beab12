-- Record outcomes for messages of one campaign, atomically with its counters.
-- KEYS[1] campaign hash, KEYS[2] not-sent index set
-- ARGV[1] message key prefix, ARGV[2] retention s, ARGV[3] "normal" | "requeue",
-- ARGV[4] SES message id index prefix (SES id -> our message id, for feedback)
-- ARGV[5..] groups of 6: message id, new state, code, reason, ses message id, row json
-- A message recorded "sent" never changes again; other final states change only in
-- "requeue" mode (retry-failed, resend-unknown). Marks the campaign completed when the last
-- message becomes final. Returns {campaign_state, applied_count}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local camp = KEYS[1]
local prefix, ttl, mode, ses_index = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local final = {sent=true, failed=true, suppressed=true, unknown=true, cancelled=true}
local applied = 0
for i = 5, #ARGV, 6 do
  local mid, new = ARGV[i], ARGV[i + 1]
  local key = prefix .. mid
  local old = redis.call('HGET', key, 'state') or 'queued'
  local allowed = old ~= 'sent' and (not final[old] or old == new or mode == 'requeue')
  if allowed then
    if old ~= new then
      redis.call('HINCRBY', camp, old, -1)
      redis.call('HINCRBY', camp, new, 1)
    end
    redis.call('HSET', key, 'state', new, 'code', ARGV[i + 2], 'reason', ARGV[i + 3],
      'updated_at', now)
    if ARGV[i + 4] ~= '' then
      redis.call('HSET', key, 'ses_message_id', ARGV[i + 4])
      redis.call('SET', ses_index .. ARGV[i + 4], mid, 'EX', ttl)
    end
    if ARGV[i + 5] ~= '' then redis.call('HSET', key, 'row', ARGV[i + 5]) end
    if new == 'sent' then
      redis.call('HDEL', key, 'lease_until', 'lease_token', 'row')
      redis.call('SREM', KEYS[2], mid)
    elseif new == 'queued' or new == 'sending' then
      redis.call('SREM', KEYS[2], mid)
    else
      redis.call('SADD', KEYS[2], mid)
    end
    if new ~= 'sending' then redis.call('HDEL', key, 'lease_until', 'lease_token') end
    redis.call('EXPIRE', key, ttl)
    applied = applied + 1
  end
end
local cstate = redis.call('HGET', camp, 'state') or 'missing'
if redis.call('HGET', camp, 'enqueued_all') == '1' and
   (cstate == 'running' or cstate == 'enqueueing' or cstate == 'completed') then
  local c = redis.call('HMGET', camp, 'queued', 'sending', 'retrying', 'deferred')
  local open = 0
  for _, v in ipairs(c) do open = open + tonumber(v or '0') end
  if open == 0 and cstate ~= 'completed' then
    redis.call('HSET', camp, 'state', 'completed', 'finished_at', now)
    cstate = 'completed'
  elseif open > 0 and cstate == 'completed' then
    redis.call('HSET', camp, 'state', 'running')
    cstate = 'running'
  end
end
return {cstate, applied}
