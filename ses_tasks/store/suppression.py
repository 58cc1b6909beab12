"""The local suppression list: addresses we never send to again.

Checked by workers when they claim a batch, so an address suppressed after a campaign was
enqueued (a bounce arriving mid-campaign) is still skipped. Each entry keeps why, when and
from where (``user`` or ``feedback``), so a mistaken suppression can be found and undone.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import redis

from ses_tasks.keys import Keys

__all__ = ["EXPORT_FIELDS", "SuppressionEntry", "SuppressionList"]

#: Columns of ``export_csv``, in order.
EXPORT_FIELDS = ("email", "reason", "source", "added_at")


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    email: str
    reason: str
    added_at: float
    #: ``user`` (CLI, API) or ``feedback`` (a bounce or complaint notification).
    source: str = "user"

    def to_dict(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "reason": self.reason,
            "source": self.source,
            "added_at": self.added_at,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(email: Any, raw: Any) -> SuppressionEntry:
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    return SuppressionEntry(
        email=_text(email),
        reason=str(data.get("reason", "")),
        added_at=float(data.get("at", 0) or 0),
        source=str(data.get("source", "user")),
    )


def normalize(email: str) -> str:
    return email.strip().lower()


class SuppressionList:
    def __init__(self, client: redis.Redis, *, key_prefix: str = "sestasks") -> None:
        self.redis = client
        self.keys = Keys(key_prefix)
        self.key = self.keys.suppression()

    def add(
        self,
        emails: Iterable[str],
        *,
        reason: str = "added by user",
        source: str = "user",
        overwrite: bool = True,
        at: float | None = None,
    ) -> int:
        """Suppress ``emails``; returns how many were new.

        With ``overwrite=False`` an address already listed keeps its first reason and time
        (feedback uses this, so a later duplicate bounce does not rewrite history).
        """
        entry = json.dumps(
            {"reason": reason, "at": time.time() if at is None else at, "source": source}
        )
        names = [normalize(email) for email in emails if email.strip()]
        if not names:
            return 0
        if overwrite:
            return int(self.redis.hset(self.key, mapping=dict.fromkeys(names, entry)))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hsetnx(self.key, name, entry)
        return sum(int(bool(added)) for added in pipe.execute())

    def remove(self, emails: Iterable[str]) -> int:
        names = [normalize(email) for email in emails if email.strip()]
        if not names:
            return 0
        # The suppression hash and each address's transient-bounce key live in different
        # Redis Cluster slots: no MULTI/EXEC across them (the transient count is a hint).
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.key, *names)
        for name in names:
            pipe.delete(self.keys.transient_bounces(name))
        return int(pipe.execute()[0])

    def contains(self, email: str) -> bool:
        return bool(self.redis.hexists(self.key, normalize(email)))

    def get(self, email: str) -> SuppressionEntry | None:
        name = normalize(email)
        raw = self.redis.hget(self.key, name)
        return None if raw is None else _entry(name, raw)

    def record_transient(
        self, email: str, event_id: str, *, window_s: float, now: float | None = None
    ) -> int:
        """Count one transient bounce (idempotent per ``event_id``); returns the count
        inside the window, older ones dropped."""
        now = time.time() if now is None else now
        key = self.keys.transient_bounces(normalize(email))
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(key, {event_id: now})
        pipe.zremrangebyscore(key, "-inf", now - window_s)
        pipe.zcard(key)
        pipe.expire(key, max(1, int(window_s) + 60))
        return int(pipe.execute()[2])

    def __iter__(self) -> Iterator[SuppressionEntry]:
        for email, raw in self.redis.hscan_iter(self.key, count=1000):
            yield _entry(email, raw)

    def __len__(self) -> int:
        return int(self.redis.hlen(self.key))

    def export_csv(self, out: TextIO) -> int:
        """Write ``email,reason,source,added_at`` (ISO 8601 UTC) rows; returns the count."""
        writer = csv.writer(out)
        writer.writerow(EXPORT_FIELDS)
        count = 0
        for entry in sorted(self, key=lambda e: (e.added_at, e.email)):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.added_at))
            writer.writerow([entry.email, entry.reason, entry.source, stamp])
            count += 1
        return count
