"""One worker process of the fleet does a job at a time: a Redis lock with a TTL.

Every process runs the loop and asks for the lock each pass; the holder keeps it by
renewing, and when it dies the lock expires and another process takes over. No extra
service to deploy, and no job stalls longer than the TTL. Taking and renewing is one
script, so a holder whose lock just expired never renews another process's lock.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["hold", "release"]

log = logging.getLogger(__name__)

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

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_scripts: dict[tuple[int, str], Any] = {}


def _script(redis: Any, source: str) -> Any:
    script = _scripts.get((id(redis), source))
    if script is None:
        script = _scripts[(id(redis), source)] = redis.register_script(source)
    return script


async def hold(redis: Any, key: str, token: str, ttl_ms: int) -> bool:
    """Take or keep the lock ``key`` for ``token``; True while we hold it."""
    return bool(await _script(redis, HOLD_LUA)(keys=[key], args=[token, ttl_ms]))


async def release(redis: Any, key: str, token: str) -> None:
    """Give the lock up at shutdown, so another process takes over now, not at the TTL.

    Best effort: a lock we fail to release expires at its TTL anyway.
    """
    try:
        await _script(redis, RELEASE_LUA)(keys=[key], args=[token])
    except Exception as exc:
        log.debug("could not release %s (%s); it expires at its TTL", key, exc)
