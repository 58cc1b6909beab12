"""One worker process of the fleet does a job at a time: a Redis lock with a TTL.

Every process runs the loop and asks for the lock each pass; the holder keeps it by
renewing, and when it dies the lock expires and another process takes over. No extra
service to deploy, and no job stalls longer than the TTL. Taking and renewing is one
script, so a holder whose lock just expired never renews another process's lock.
"""

from __future__ import annotations

from typing import Any

__all__ = ["hold"]

HOLD_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_scripts: dict[int, Any] = {}


async def hold(redis: Any, key: str, token: str, ttl_ms: int) -> bool:
    """Take or keep the lock ``key`` for ``token``; True while we hold it."""
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(HOLD_LUA)
    return bool(await script(keys=[key], args=[token, ttl_ms]))
