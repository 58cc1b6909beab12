-- GCRA reservation of n tokens (recipients) with two priorities.
-- KEYS[1] limiter hash (fields: tat, qtat, f, fchg, thr, reason, prev, at), KEYS[2] its
-- change log (rate changes are recorded there when given)
-- ARGV[1] now_us override ('' = server TIME), ARGV[2] n, ARGV[3] configured rate per s,
-- ARGV[4] transactional tolerance us, ARGV[5] bulk tolerance us, ARGV[6] bulk lookahead us,
-- ARGV[7] priority ('t' | 'b'), ARGV[8] max wait us (-1 = none),
-- ARGV[9] mode ('fresh' | 'again' | 'force'), ARGV[10] recovery step (fraction of the
-- configured rate per interval), ARGV[11] recovery interval us, ARGV[12] key ttl ms,
-- ARGV[13] campaign ('' = none), ARGV[14] account (for the change log, KEYS[2])
-- Returns {status, wait_us, field, stored_tat, previous_tat, changed, old_f, f}
--   status 'ok'    tokens reserved: send after wait_us
--   status 'later' bulk beyond its horizon, nothing reserved: ask again after wait_us
--   status 'long'  the wait would exceed max wait, nothing reserved
local key = KEYS[1]
local now = server_now_us(ARGV[1])
local n = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local tol_tx = tonumber(ARGV[4])
local tol_bulk = tonumber(ARGV[5])
local lookahead = tonumber(ARGV[6])
local transactional = ARGV[7] == 't'
local max_wait = tonumber(ARGV[8])
local mode = ARGV[9]
local f, changed, old_f = refresh_factor(key, now, tonumber(ARGV[10]), tonumber(ARGV[11]),
  change_log(KEYS[2], rate, ARGV[14]))

local cost = n * 1000000 / (rate * f)
local campaign = ARGV[13] or ''
if campaign ~= '' and not transactional and mode == 'fresh' then
  -- The dispatcher asked one batch of this campaign to make room for a new campaign
  -- (the field holds the request's deadline; a late one is dropped unanswered).
  local y = tonumber(redis.call('HGET', key, 'y:' .. campaign) or '')
  if y then
    redis.call('HDEL', key, 'y:' .. campaign)
    if y > now then return {'yield', '0', 'none', '0', '0', changed, fmt(old_f), fmt(f)} end
  end
  local sh = redis.call('HMGET', key, 's:' .. campaign, 'sat')
  local share = tonumber(sh[1])
  if share and share < 1 and tonumber(sh[2] or '0') >= now - SHARES_FRESH_US then
    local cfield = 'c:' .. campaign
    local cbase = math.max(tonumber(redis.call('HGET', key, cfield)) or now, now)
    local cstored = math.ceil(cbase + cost / share)
    redis.call('HSET', key, cfield, fmt_int(cstored))
    local cwait = cstored - now - tol_bulk
    if cwait > 0 then
      return {'later', fmt_int(math.ceil(cwait)), 'none', fmt_int(cstored), fmt_int(cbase),
        changed, fmt(old_f), fmt(f)}
    end
  end
end
local st = redis.call('HMGET', key, 'tat', 'qtat')
local tat = tonumber(st[1]) or now
local base = math.max(tat, now)
local status, wait, field, stored, previous

-- Bulk callers asking for the first time line up behind those already told to come back.
local q = base
if mode == 'fresh' then q = math.max(tonumber(st[2]) or 0, base) end

if not transactional and mode ~= 'force' and q - now > tol_bulk + lookahead then
  -- Bulk may not queue reservations deeper than its lookahead: a transactional request
  -- must never wait behind a long line of promised bulk sends. Tell the caller when to
  -- come back instead. A first-time caller gets a slot at the end of a virtual line (qtat)
  -- so that waiting callers come back one after another, not all at once; a caller coming
  -- back (pushed further by transactional traffic) gets the time until bulk fits again.
  field = 'qtat'
  if mode ~= 'fresh' then field = 'none' end  -- nothing written, nothing to refund
  wait = q - now - tol_bulk - lookahead
  previous = tonumber(st[2]) or 0
  stored = math.ceil(q + cost)
  if max_wait >= 0 and wait > max_wait then
    status = 'long'
  else
    status = 'later'
    if mode == 'fresh' then redis.call('HSET', key, 'qtat', fmt_int(stored)) end
  end
else
  field = 'tat'
  local tol = tol_bulk
  if transactional then tol = tol_tx end
  previous = base
  stored = math.ceil(base + cost)
  wait = math.max(0, base + cost - now - tol)
  if max_wait >= 0 and wait > max_wait then
    status = 'long'
  else
    status = 'ok'
    redis.call('HSET', key, 'tat', fmt_int(stored))
  end
end
redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[12]) + math.max(0, stored - now) / 1000))
return {status, fmt_int(math.ceil(wait)), field, fmt_int(stored), fmt_int(previous),
  changed, fmt(old_f), fmt(f)}
