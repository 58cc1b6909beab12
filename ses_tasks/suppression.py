"""The local suppression list: addresses we never send to again.

Checked by workers when they claim a batch, so an address suppressed after a campaign was
enqueued (a bounce arriving mid-campaign) is still skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from .keys import Keys

__all__ = ["SuppressionEntry", "SuppressionList"]


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    email: str
    reason: str
    added_at: float


class SuppressionList:
    def __init__(self, client: redis.Redis, *, key_prefix: str = "sestasks") -> None:
        self.redis = client
        self.key = Keys(key_prefix).suppression()

    def add(self, emails: Iterable[str], *, reason: str = "added by user") -> int:
        entry = json.dumps({"reason": reason, "at": time.time()})
        mapping = {email.strip().lower(): entry for email in emails if email.strip()}
        return int(self.redis.hset(self.key, mapping=mapping)) if mapping else 0

    def remove(self, emails: Iterable[str]) -> int:
        names = [email.strip().lower() for email in emails if email.strip()]
        return int(self.redis.hdel(self.key, *names)) if names else 0

    def contains(self, email: str) -> bool:
        return bool(self.redis.hexists(self.key, email.strip().lower()))

    def __iter__(self) -> Iterator[SuppressionEntry]:
        for email, raw in self.redis.hscan_iter(self.key, count=1000):
            data = json.loads(raw)
            yield SuppressionEntry(
                email=email.decode() if isinstance(email, bytes) else email,
                reason=data.get("reason", ""),
                added_at=float(data.get("at", 0)),
            )

    def __len__(self) -> int:
        return int(self.redis.hlen(self.key))
