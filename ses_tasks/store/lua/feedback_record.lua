-- Record one SES feedback event on a message and its campaign, idempotently.
-- KEYS[1] campaign hash, KEYS[2] message hash
-- ARGV[1] feedback name (delivered|bounced|complained|delayed|rejected), ARGV[2] its rank
-- (a later event only replaces the message's `feedback` if its rank is not lower),
-- ARGV[3] bounce type, ARGV[4] bounce subtype, ARGV[5] diagnostic, ARGV[6] detail
-- (complaint feedback type, delay type or reject reason), ARGV[7..] campaign counters to
-- add one to, each at most once per message (the message keeps an `fb:<counter>` flag).
-- The per-state counters are never touched: they keep adding up to `total`.
-- Returns {"missing"} | {"duplicate"} | {"applied", sent, hard_bounced, complained, state}.
if redis.call('EXISTS', KEYS[2]) == 0 then return {'missing'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local camp, msg = KEYS[1], KEYS[2]
local name, rank = ARGV[1], tonumber(ARGV[2])
local new = false
for i = 7, #ARGV do
  if redis.call('HSETNX', msg, 'fb:' .. ARGV[i], now) == 1 then
    new = true
    if redis.call('EXISTS', camp) == 1 then redis.call('HINCRBY', camp, ARGV[i], 1) end
  end
end
if not new then return {'duplicate'} end
local current = tonumber(redis.call('HGET', msg, 'feedback_rank') or '0')
if rank >= current then
  redis.call('HSET', msg, 'feedback', name, 'feedback_rank', rank, 'feedback_at', now)
end
if name == 'bounced' then
  redis.call('HSET', msg, 'bounce_type', ARGV[3], 'bounce_subtype', ARGV[4],
    'diagnostic', ARGV[5])
elseif name == 'complained' then
  redis.call('HSET', msg, 'complaint_type', ARGV[6])
elseif name == 'delayed' then
  redis.call('HSET', msg, 'delay_type', ARGV[6], 'diagnostic', ARGV[5])
elseif name == 'rejected' then
  redis.call('HSET', msg, 'reject_reason', ARGV[6])
end
local c = redis.call('HMGET', camp, 'sent', 'hard_bounced', 'complained', 'state')
return {'applied', c[1] or '0', c[2] or '0', c[3] or '0', c[4] or 'missing'}
