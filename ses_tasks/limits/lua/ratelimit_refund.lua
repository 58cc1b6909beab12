-- Give back a reservation whose caller was cancelled before sending, but only while it is
-- still the last one: rewinding past a later reservation would let a new request share
-- that later request's slot and break the rate.
-- KEYS[1] limiter hash; ARGV[1] field ('tat' | 'qtat'), ARGV[2] value we stored,
-- ARGV[3] value to restore. Returns 1 if refunded.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
