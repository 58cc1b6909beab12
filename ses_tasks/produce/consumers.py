"""Warn a producer, once, when nobody consumes what it enqueues.

Queue names depend on the port mode, so a web process configured for STARTTLS and workers
started with ``--mode tls`` leave mail queued with no consumer and no error. Workers name
the queues they consume in their heartbeat; the producer looks at most once a minute per
queue and logs a warning the first time it finds none alive (again after one came back).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ses_tasks.keys import Keys

__all__ = ["ConsumerWatch"]

log = logging.getLogger(__name__)

#: Seconds between two looks at the same queue's consumers.
CHECK_EVERY_S = 60.0


class ConsumerWatch:
    def __init__(self, redis: Any, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._lock = threading.Lock()
        self._next_check: dict[str, float] = {}
        self._warned: set[str] = set()

    def check(self, *queues: str, hint: str = "") -> bool:
        """False (and a warning, once) if no live worker consumes any of ``queues``.

        Never raises: it is advice, and a send must not fail for it.
        """
        queue = " or ".join(queues)
        now = time.monotonic()
        with self._lock:
            if now < self._next_check.get(queue, 0.0):
                return queue not in self._warned
            self._next_check[queue] = now + CHECK_EVERY_S
        try:
            now_ms = int(time.time() * 1000)
            alive = any(self._redis.zcount(self._keys.consumers(q), now_ms, "+inf") for q in queues)
        except Exception as exc:  # a warning helper must never fail a send
            log.debug("could not look for consumers of %s: %s", queue, exc)
            return True
        with self._lock:
            if alive:
                self._warned.discard(queue)
                return True
            if queue in self._warned:
                return False
            self._warned.add(queue)
        log.warning(
            "no running worker consumes queue %s: messages wait there until one does%s",
            queue,
            f" ({hint})" if hint else "",
        )
        return False
