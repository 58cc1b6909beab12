"""Per-process worker state that outlives tasks.

A Celery task body is synchronous; our sends are asyncio. Each worker process owns one
event loop running in a daemon thread, one warm SMTP pool, one asyncio Redis client and the
fleet limiter. Tasks hand coroutines to that loop and wait for the answer, so connections,
TLS sessions and script SHAs stay warm across tasks. Warm-up starts at process init without
blocking it; shutdown sends QUIT on every connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis

from ..config import Settings, load_settings
from ..endpoint import make_tls_context
from ..quota import DailyQuota
from ..ratelimit import FleetRateLimiter
from ..smtp.pool import SmtpPool
from ..tracking import AsyncStatusStore

__all__ = ["WorkerRuntime", "get_runtime", "shutdown_runtime"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOSE_TIMEOUT_S = 10.0


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Identifies this process's leases on messages it is sending.
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="ses-tasks-loop", daemon=True
        )
        self._started = False
        self._closed = False
        self.redis: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url)
        self.store = AsyncStatusStore(
            self.redis, key_prefix=settings.key_prefix, retention_s=settings.retention_s
        )
        self.limiter = FleetRateLimiter(
            self.redis,
            key_prefix=settings.key_prefix,
            rate_per_s=settings.max_send_rate,
            burst=settings.burst,
            transactional_reserve=settings.transactional_reserve,
        )
        self.quota = DailyQuota(
            self.redis,
            key_prefix=settings.key_prefix,
            limit=settings.max_24h_send,
            window_s=settings.quota_window_s,
        )
        self.pool = SmtpPool(
            settings.endpoint,
            tls_context=make_tls_context(settings.ca_file),
            username=settings.username,
            password=settings.smtp_password(),
            size=settings.pool_size,
            min_size=min(settings.pool_min_size, settings.pool_size),
            max_messages_per_connection=settings.max_messages_per_connection,
            max_age_s=settings.max_connection_age,
            idle_check_s=settings.idle_check_s,
            connect_timeout_s=settings.connect_timeout,
            send_timeout_s=settings.send_timeout,
        )
        self.templates: dict[str, Any] = {}

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        """Start the loop thread and begin warming connections; returns at once."""
        if self._started:
            return
        self._started = True
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.pool.start(), self.loop)
        log.info("worker runtime started: %r", self.pool)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this process's loop and wait for its result."""
        self.start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """QUIT every connection, close Redis, stop the loop. Idempotent."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True

        async def _close() -> None:
            try:
                await self.pool.close()
            finally:
                await self.redis.aclose()

        future = asyncio.run_coroutine_threadsafe(_close(), self.loop)
        try:
            future.result(timeout=CLOSE_TIMEOUT_S)
        except Exception:  # pragma: no cover - best effort at exit
            log.warning("worker runtime did not close cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        log.info("worker runtime closed: %r", self.pool)


_runtime: WorkerRuntime | None = None
_runtime_pid = -1
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, created on first use in this process (after fork)."""
    global _runtime, _runtime_pid
    with _runtime_lock:
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = WorkerRuntime(load_settings())
            _runtime_pid = os.getpid()
        runtime = _runtime
    runtime.start()
    return runtime


def shutdown_runtime() -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None and _runtime_pid == os.getpid():
            _runtime.close()
        _runtime = None
