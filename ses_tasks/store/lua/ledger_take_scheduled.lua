-- The scheduler takes ledger entries whose time has come (single messages sent with
-- send_at), and pushes their due time out as a fresh enqueue would: the sweeper
-- republishes one whose publish is lost after the redeliver-after.
-- KEYS[1] campaign hash, KEYS[2] batch ledger hash, KEYS[3] ledger due zset
-- ARGV[1] redeliver-after ms, ARGV[2..] batch ids (the scheduled index's members)
-- Returns {campaign_state, id_1, payload_1 | '', ...}: '' when the entry is gone (settled)
-- or not due (the sweeper or a worker took it already): the index member is dropped.
-- The campaign's state is not checked: delivery defers or parks what a pause holds back.
local now = now_ms()
local out = {redis.call('HGET', KEYS[1], 'state') or 'missing'}
for i = 2, #ARGV do
  local id = ARGV[i]
  local payload = redis.call('HGET', KEYS[2], id)
  local due = redis.call('ZSCORE', KEYS[3], id)
  table.insert(out, id)
  if payload and due and tonumber(due) <= now then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), id)
    table.insert(out, payload)
  else
    table.insert(out, '')
  end
end
return out
