"""The local suppression list: addresses we never send to again.

Checked by workers when they claim a batch, so an address suppressed after a campaign was
enqueued (a bounce arriving mid-campaign) is still skipped. Each entry keeps why, when and
from where (``user`` or ``feedback``), so a mistaken suppression can be found and undone.

Every address is keyed by :func:`~ses_tasks.message.address.canonical_address` (Punycode
domain, all lower case), inside this module, so a caller cannot bypass it: SES reports
``user@xn--bcher-kva.example`` for a message sent to ``user@bücher.example``, and both must be
one entry. An invalid address raises :class:`~ses_tasks.errors.ValidationError`.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TextIO

import redis
from email_validator import EmailNotValidError, validate_email

from ses_tasks.errors import ValidationError
from ses_tasks.keys import Keys
from ses_tasks.message.address import canonical_address

__all__ = ["EXPORT_FIELDS", "SuppressionEntry", "SuppressionList", "lookup_fields"]

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


@lru_cache(maxsize=4096)
def _unicode_domain(ascii_domain: str) -> str | None:
    try:
        return validate_email("x@" + ascii_domain, check_deliverability=False).domain.lower()
    except EmailNotValidError:
        return None


def _fields(email: str, field: str = "email") -> tuple[str, ...]:
    """The canonical field, then those older versions may have written for the same address
    (``strip().lower()`` of what they were given, which kept unicode domains), so entries
    listed before keys were canonical still suppress and can still be removed."""
    name = canonical_address(email, field)
    legacy = {email.strip().lower()}
    local, _, domain = name.rpartition("@")
    if "xn--" in domain and (decoded := _unicode_domain(domain)) is not None:
        legacy.add(f"{local}@{decoded}")
    legacy.discard(name)
    return (name, *sorted(legacy))


def lookup_fields(email: str) -> tuple[str, ...]:
    """The hash fields that suppress ``email``, for the claim path's ``HMGET``.

    Never raises: an invalid recipient is failed later, when it is rendered, and a batch
    must not stop here because of it (only an exact, pre-canonical entry can match it).
    """
    try:
        return _fields(email)
    except ValidationError:
        return (email.strip().lower(),)


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
        legacy_of: dict[str, set[str]] = {}
        for i, email in enumerate(emails):
            if email.strip():
                name, *legacy = _fields(email, f"emails[{i}]")
                legacy_of.setdefault(name, set()).update(legacy)
        if not legacy_of:
            return 0
        prior = self._legacy_entries(legacy_of)
        # An address listed under a pre-canonical field moves to its canonical one (keeping
        # its first entry unless overwriting) and is not counted as new.
        pipe = self.redis.pipeline(transaction=False)
        for name in legacy_of:
            if overwrite:
                pipe.hset(self.key, name, entry)
            else:
                pipe.hsetnx(self.key, name, prior.get(name, entry))
        for name in prior:
            pipe.hdel(self.key, *legacy_of[name])
        replies = pipe.execute()[: len(legacy_of)]
        return sum(
            int(bool(r)) for name, r in zip(legacy_of, replies, strict=True) if name not in prior
        )

    def _legacy_entries(self, legacy_of: dict[str, set[str]]) -> dict[str, Any]:
        """Canonical field -> the entry stored under one of its pre-canonical fields."""
        pairs = [(name, old) for name, olds in legacy_of.items() for old in sorted(olds)]
        if not pairs:
            return {}
        found: dict[str, Any] = {}
        for (name, _), raw in zip(
            pairs, self.redis.hmget(self.key, [o for _, o in pairs]), strict=True
        ):
            if raw is not None:
                found.setdefault(name, raw)
        return found

    def remove(self, emails: Iterable[str]) -> int:
        """Unsuppress ``emails`` (any form, pre-canonical entries too); returns how many
        addresses were listed."""
        groups = [_fields(email, f"emails[{i}]") for i, email in enumerate(emails) if email.strip()]
        if not groups:
            return 0
        # The suppression hash and each address's transient-bounce key live in different
        # Redis Cluster slots: no MULTI/EXEC across them (the transient count is a hint).
        pipe = self.redis.pipeline(transaction=False)
        for names in groups:
            pipe.hdel(self.key, *names)
        for names in groups:
            for name in names:
                pipe.delete(self.keys.transient_bounces(name))
        return sum(int(bool(n)) for n in pipe.execute()[: len(groups)])

    def contains(self, email: str) -> bool:
        return self.get(email) is not None

    def get(self, email: str) -> SuppressionEntry | None:
        """The entry suppressing ``email`` (its canonical one first, else a pre-canonical one)."""
        names = _fields(email)
        for name, raw in zip(names, self.redis.hmget(self.key, list(names)), strict=True):
            if raw is not None:
                return _entry(name, raw)
        return None

    def record_transient(
        self, email: str, event_id: str, *, window_s: float, now: float | None = None
    ) -> int:
        """Count one transient bounce (idempotent per ``event_id``); returns the count
        inside the window, older ones dropped."""
        now = time.time() if now is None else now
        key = self.keys.transient_bounces(canonical_address(email))
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
