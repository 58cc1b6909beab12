-- What the scheduler has to do now, and how long until the next thing after that.
-- KEYS[1] the scheduled index (member -> due ms). ARGV[1] limit.
-- Returns {next_in_ms, member_1, ...}: members due now (at most the limit); next_in_ms is
-- the wait until the first one not taken (0 if more are due than the limit, -1 if none).
local now = now_ms()
local limit = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local next_in = -1
if #due >= limit then
  next_in = 0
else
  local after = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #after > 0 then next_in = math.max(0, tonumber(after[2]) - now) end
end
local out = {next_in}
for _, m in ipairs(due) do table.insert(out, m) end
return out
