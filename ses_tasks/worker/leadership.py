"""One worker process of the fleet does a job at a time: a Redis lock with a TTL.

Every process runs the loop and asks for the lock each pass; the holder keeps it by
renewing, and when it dies the lock expires and another process takes over. No extra
service to deploy, and no job stalls longer than the TTL.
"""

from __future__ import annotations

from typing import Any

__all__ = ["hold"]


async def hold(redis: Any, key: str, token: str, ttl_ms: int) -> bool:
    """Take or keep the lock ``key`` for ``token``; True while we hold it."""
    if await redis.set(key, token, nx=True, px=ttl_ms):
        return True
    holder = await redis.get(key)
    if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == token:
        await redis.pexpire(key, ttl_ms)
        return True
    return False
