-- Privacy: a campaign's bodies go once no message can be sent with them again.
-- KEYS[1] campaign hash, KEYS[2] its template. Deletes the template when the campaign is
-- completed with no failed or unknown message (retry-failed needs it while any exist).
-- Returns 1 if it deleted it.
if redis.call('HGET', KEYS[1], 'state') ~= 'completed' then return 0 end
local failed = tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
local unknown = tonumber(redis.call('HGET', KEYS[1], 'unknown') or '0')
if failed + unknown > 0 then return 0 end
return redis.call('DEL', KEYS[2])
