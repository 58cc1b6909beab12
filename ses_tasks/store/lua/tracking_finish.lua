-- Record outcomes of one campaign's messages, hand back unsent ones and settle the batch
-- ledger, atomically with the counters.
-- KEYS[1] campaign hash, KEYS[2] not-sent set, KEYS[3] batch ledger hash, KEYS[4] ledger
-- due zset, KEYS[5..] message hashes: first one per transition, then one per release,
-- then the backlog zset (follow-ups with delay -1 go there, for the dispatcher), then the
-- timeline hash of the caller's current hour (store/timeline.py)
-- ARGV[1] retention s, ARGV[2] "normal" | "requeue", ARGV[3] lease token ('' = any),
-- ARGV[4] transition count T, ARGV[5] release count R, ARGV[6] batch id done ('' none),
-- ARGV[7] follow-up count F, ARGV[8] publish grace ms, ARGV[9] timeline bucket start
-- (Unix s, the caller's clock), ARGV[10] timeline TTL s,
-- then T groups of 5: new state, code, reason, ses message id, row json;
-- then F groups of 3: follow-up batch id, payload json, delay ms (-1: to the backlog, for
-- the dispatcher; -2: due now, for the scheduler and the sweeper).
-- Rules: "sent" never changes; other final states change only in "requeue" mode, which
-- changes nothing else (an open message is left alone); a
-- message another worker took over (lease token not ours) is left to that worker unless
-- we sent it. Releases put our own "sending" messages back to "queued". Follow-ups enter
-- the ledger (due after their delay plus the publish grace, so the sweeper republishes
-- one whose publish is lost) in the same step that removes the finished batch.
-- The timeline counts the messages that became sent or failed here (not a no-op rewrite
-- of a state already held), so its sent total matches the sent counter's moves.
-- Returns {campaign_state, applied, now_ms}.
local now = now_ms()
local camp = KEYS[1]
local ttl, mode, token = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local nt, nr, done, nf = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local grace = tonumber(ARGV[8])
local bucket, tl_ttl = ARGV[9], tonumber(ARGV[10])
local applied, n_sent, n_failed = 0, 0, 0
local a = 11
for i = 1, nt do
  local key = KEYS[4 + i]
  local mid = string.match(key, '[^:]*$')
  local new, code, reason, ses_id, row = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local rec = redis.call('HMGET', key, 'state', 'lease_token')
  local old = rec[1] or 'queued'
  local allowed
  if mode == 'requeue' then
    -- retry-failed reopens final messages only: never one a worker holds or will send.
    allowed = old ~= 'sent' and (FINAL[old] or old == new)
  else
    allowed = old ~= 'sent' and (not FINAL[old] or old == new)
  end
  if allowed and token ~= '' and old == 'sending' and rec[2] and rec[2] ~= token
     and new ~= 'sent' then
    allowed = false
  end
  if allowed then
    move(camp, old, new)
    if old ~= new and new == 'sent' then n_sent = n_sent + 1 end
    if old ~= new and new == 'failed' then n_failed = n_failed + 1 end
    redis.call('HSET', key, 'state', new, 'code', code, 'reason', reason, 'updated_at', now)
    if ses_id ~= '' then redis.call('HSET', key, 'ses_message_id', ses_id) end
    if row ~= '' then redis.call('HSET', key, 'row', row) end
    if new == 'sent' then
      redis.call('HDEL', key, 'row')
      redis.call('SREM', KEYS[2], mid)
    elseif OPEN[new] and new ~= 'deferred' and new ~= 'retrying' then
      redis.call('SREM', KEYS[2], mid)
    else
      redis.call('SADD', KEYS[2], mid)
    end
    if new ~= 'sending' then redis.call('HDEL', key, 'lease_until', 'lease_token') end
    if rec[1] == false then redis.call('HSET', key, 'created_at', now) end
    redis.call('EXPIRE', key, ttl)
    applied = applied + 1
  end
end
for i = 1, nr do
  local key = KEYS[4 + nt + i]
  local rec = redis.call('HMGET', key, 'state', 'lease_token')
  if rec[1] == 'sending' and rec[2] == token then
    move(camp, 'sending', 'queued')
    redis.call('HSET', key, 'state', 'queued', 'updated_at', now)
    redis.call('HDEL', key, 'lease_until', 'lease_token')
  end
end
-- A batch another worker took over (our lease lapsed) is left in the ledger: that worker
-- settles it, or the sweeper hands it on if that worker dies too.
if done ~= '' and token ~= '' then
  for i = 1, nt + nr do
    local rec = redis.call('HMGET', KEYS[4 + i], 'state', 'lease_token')
    if rec[1] == 'sending' and rec[2] and rec[2] ~= token then done = '' break end
  end
end
if done ~= '' then
  redis.call('HDEL', KEYS[3], done)
  redis.call('ZREM', KEYS[4], done)
end
-- After the removal: a single message's follow-up reuses its message id as batch id.
local backlog = KEYS[5 + nt + nr]
for _ = 1, nf do
  redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 1])
  local delay = tonumber(ARGV[a + 2])
  if delay == -2 then
    -- Due now, unpublished: a single message handed back (the caller indexes it for the
    -- scheduler, which publishes it at once; the sweeper is the backstop).
    redis.call('ZADD', KEYS[4], now, ARGV[a])
  elseif delay < 0 then
    -- Back to the backlog, first in line: the dispatcher hands it out within its window.
    redis.call('ZADD', backlog, -1, ARGV[a])
    redis.call('EXPIRE', backlog, ttl)
  else
    redis.call('ZADD', KEYS[4], now + delay + grace, ARGV[a])
  end
  a = a + 3
end
if nf > 0 then
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
end
if n_sent > 0 or n_failed > 0 then
  local timeline = KEYS[6 + nt + nr]
  if n_sent > 0 then redis.call('HINCRBY', timeline, bucket .. ':s', n_sent) end
  if n_failed > 0 then redis.call('HINCRBY', timeline, bucket .. ':f', n_failed) end
  redis.call('EXPIRE', timeline, tl_ttl)
end
return {check_completed(camp, now), applied, tostring(now)}
