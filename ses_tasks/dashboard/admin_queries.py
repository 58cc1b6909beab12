"""The Redis reads behind the suppression, limits and workers pages: each costs what one
page shows, whatever the store holds.

- Suppression: the list is one hash (address -> entry). A page is HSCAN replies from a
  cursor until it holds ``PAGE_SIZE`` rows; a search is ``HSCAN MATCH *q*`` with at most
  ``MAX_SCANS_PER_PAGE`` calls (and ``SEARCH_BUDGET_S``), so a query that matches little in
  a million entries answers at once with a link to scan further. A full address is also
  looked up exactly (HMGET), so it is found on the first page however large the list.
- Limits: per sender profile, the limiter's and quota's status scripts (one round trip
  each), the limiter's last rate changes (one LRANGE), and the paused campaigns among the
  newest ``CAMPAIGN_SCAN`` of the index plus those with work (one pipeline of HMGETs).
- Workers: the heartbeat's ``workers-seen`` index and one GET per process
  (``ses_tasks.worker.heartbeat``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from ses_tasks.config import Settings
from ses_tasks.keys import TRANSACTIONAL, Keys
from ses_tasks.limits.quota import QuotaStatus
from ses_tasks.limits.ratelimit import LimiterStatus, RateChange
from ses_tasks.states import CampaignState
from ses_tasks.store.suppression import SuppressionEntry, _entry, lookup_fields
from ses_tasks.worker import heartbeat
from ses_tasks.worker.dispatcher import HEARTBEAT_S
from ses_tasks.worker.lanes import account_of, make_limiter, make_quota

__all__ = [
    "AIMD_ROWS",
    "CAMPAIGN_SCAN",
    "MAX_SCANS_PER_PAGE",
    "PAGE_SIZE",
    "STALE_AFTER_S",
    "AccountRow",
    "PausedRow",
    "SuppressionPage",
    "WorkerRow",
    "account_rows",
    "iter_suppressed",
    "paused_campaigns",
    "recent_rate_changes",
    "suppression_page",
    "worker_rows",
]

#: Rows on one page of the suppression list.
PAGE_SIZE = 50
#: HSCAN calls one search page may make (each looks at about ``SCAN_COUNT`` entries)...
MAX_SCANS_PER_PAGE = 20
SCAN_COUNT = 1000
#: ...and the time it may take, so the page answers well within 100 ms on a busy server.
SEARCH_BUDGET_S = 0.05
#: Rate changes shown, newest first, across accounts.
AIMD_ROWS = 50
#: Newest campaigns of the index looked at for paused ones (plus every campaign with work).
CAMPAIGN_SCAN = 1000
#: A worker silent this long missed its beats: the dispatcher no longer counts it.
STALE_AFTER_S = 3 * HEARTBEAT_S
#: Worker processes listed at most (most recently seen first).
WORKER_ROWS = 500


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Suppression ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuppressionPage:
    entries: list[SuppressionEntry]
    #: HSCAN cursor of the next page; None on the last one.
    next_cursor: int | None
    #: Addresses on the whole list.
    total: int


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def _ascii_labels(text: str) -> str:
    """Non-ASCII domain labels in their stored (Punycode) form: ``bücher`` -> ``xn--bcher-kva``."""
    labels = []
    for label in text.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(label.encode("idna").decode("ascii"))
        except UnicodeError:
            labels.append(label)
    return ".".join(labels)


def _query_pattern(q: str) -> str:
    """``*q*`` on the stored (canonical: lower-case, ASCII domain) addresses."""
    q = q.strip().lower()
    if not q.isascii():
        local, at, domain = q.rpartition("@")
        q = local + at + _ascii_labels(domain)
    return f"*{_glob_escape(q)}*"


async def suppression_page(
    redis: aioredis.Redis, keys: Keys, *, q: str = "", cursor: int = 0, limit: int = PAGE_SIZE
) -> SuppressionPage:
    """One page of the list (or of the entries whose address contains ``q``) from ``cursor``."""
    key = keys.suppression()
    found: dict[str, SuppressionEntry] = {}
    q = q.strip()
    if q and cursor == 0 and "@" in q:
        fields = list(lookup_fields(q))
        for name, raw in zip(fields, await redis.hmget(key, fields), strict=True):
            if raw is not None:
                found.setdefault(name, _entry(name, raw))
    pattern = _query_pattern(q) if q else None
    count = SCAN_COUNT if pattern else limit
    scans = 0
    deadline = time.monotonic() + SEARCH_BUDGET_S
    while True:
        cursor, items = await redis.hscan(key, cursor, match=pattern, count=count)
        for email, raw in cast("dict[Any, Any]", items).items():
            name = _text(email)
            found.setdefault(name, _entry(name, raw))
        scans += 1
        if cursor == 0 or len(found) >= limit or scans >= MAX_SCANS_PER_PAGE:
            break
        if time.monotonic() >= deadline:
            break
    total = int(await redis.hlen(key))
    entries = sorted(found.values(), key=lambda e: e.email)
    return SuppressionPage(entries, int(cursor) or None, total)


async def iter_suppressed(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[SuppressionEntry]:
    """Every entry, ``SCAN_COUNT`` at a time (an export of any size in bounded memory)."""
    cursor = 0
    while True:
        cursor, items = await redis.hscan(keys.suppression(), cursor, count=SCAN_COUNT)
        for email, raw in cast("dict[Any, Any]", items).items():
            yield _entry(email, raw)
        if cursor == 0:
            return


# Limits -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountRow:
    #: Sender profile ('' is the unnamed default).
    profile: str
    #: The limiter's and quota's account key.
    account: str
    #: Where it sends: SES region, or the host when one is configured.
    endpoint: str
    limiter: LimiterStatus
    quota: QuotaStatus


async def account_rows(redis: aioredis.Redis, settings: Settings) -> list[AccountRow]:
    """Each sender profile's configured and effective rate and 24-hour quota."""

    async def one(profile: str) -> AccountRow:
        ps = settings.for_profile(profile)
        limiter = make_limiter(redis, ps, profile)
        quota = make_quota(redis, ps, profile)
        lim, used = await asyncio.gather(limiter.status(), quota.status())
        endpoint = ps.host or ps.region
        return AccountRow(profile, account_of(profile), endpoint, lim, used)

    return list(await asyncio.gather(*(one(p) for p in ["", *settings.profiles])))


async def recent_rate_changes(
    redis: aioredis.Redis, settings: Settings, *, limit: int = AIMD_ROWS
) -> list[RateChange]:
    """The last rate changes of every profile's limiter, newest first."""

    async def one(profile: str) -> list[RateChange]:
        limiter = make_limiter(redis, settings.for_profile(profile), profile)
        return await limiter.recent_changes(limit)

    lists = await asyncio.gather(*(one(p) for p in ["", *settings.profiles]))
    merged = [c for changes in lists for c in changes]
    merged.sort(key=lambda c: c.at, reverse=True)
    return merged[:limit]


@dataclass(frozen=True, slots=True)
class PausedRow:
    campaign_id: str
    reason: str
    #: ``user`` or the system's kind (``quota``, ``endpoint``, ``feedback``...).
    kind: str
    profile: str
    subject: str
    total: int


_PAUSED_FIELDS = ("state", "reason", "pause_kind", "profile", "subject", "total")


async def paused_campaigns(
    redis: aioredis.Redis, keys: Keys, *, scan: int = CAMPAIGN_SCAN
) -> list[PausedRow]:
    """Paused campaigns among those with work and the newest ``scan`` (one pipeline)."""
    newest, active = await asyncio.gather(
        redis.zrevrange(keys.campaigns_index(), 0, scan - 1),
        redis.zrange(keys.active(), 0, scan - 1),
    )
    ids = list(dict.fromkeys([TRANSACTIONAL, *map(_text, active), *map(_text, newest)]))
    async with redis.pipeline(transaction=False) as pipe:
        for cid in ids:
            pipe.hmget(keys.campaign(cid), _PAUSED_FIELDS)
        replies: Sequence[Any] = await pipe.execute()
    rows = []
    for cid, values in zip(ids, replies, strict=True):
        texts = [_text(v) if v is not None else "" for v in values]
        data = dict(zip(_PAUSED_FIELDS, texts, strict=True))
        if data["state"] != CampaignState.PAUSED.value:
            continue
        rows.append(
            PausedRow(
                campaign_id=cid,
                reason=data["reason"],
                kind=data["pause_kind"] or "user",
                profile=data["profile"],
                subject=data["subject"],
                total=int(data["total"] or 0),
            )
        )
    return rows


# Workers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRow:
    token: str
    info: heartbeat.WorkerInfo | None
    #: Seconds since its last heartbeat.
    seen_s: float
    #: Bulk batches it runs at once, as the dispatcher counts it (None: not counted now).
    capacity: int | None

    @property
    def stale(self) -> bool:
        return self.seen_s > STALE_AFTER_S or self.capacity is None

    @property
    def key(self) -> str:
        """Stable id of the row: the Celery node name (when known), then the process token."""
        node = self.info.node if self.info is not None else ""
        return f"{node}/{self.token}" if node else self.token


async def worker_rows(
    redis: aioredis.Redis, keys: Keys, *, now: float | None = None
) -> list[WorkerRow]:
    """Worker processes seen in the last ``heartbeat.KEEP_S``, live ones first."""
    now = time.time() if now is None else now
    seen_raw, live_raw = await asyncio.gather(
        redis.zrevrange(keys.workers_seen(), 0, WORKER_ROWS - 1, withscores=True),
        redis.zrange(keys.workers(), 0, -1, withscores=True),
    )
    seen_pairs = cast("list[tuple[Any, float]]", seen_raw)
    seen = {_text(m): float(s) / 1000 for m, s in seen_pairs}
    capacity: dict[str, int] = {}
    for member, deadline in cast("list[tuple[Any, float]]", live_raw):
        token, _, cap = _text(member).rpartition("|")
        if float(deadline) / 1000 < now:
            continue  # missed three beats: the dispatcher drops it at its next round
        capacity[token] = int(cap or 0)
        # A process of an older version writes no workers-seen entry: its deadline says.
        seen.setdefault(token, float(deadline) / 1000 - 3 * HEARTBEAT_S)
    tokens = list(seen)
    async with redis.pipeline(transaction=False) as pipe:
        for token in tokens:
            pipe.get(keys.worker_info(token))
        infos = await pipe.execute()
    rows = [
        WorkerRow(
            token, heartbeat.parse_info(raw), max(0.0, now - seen[token]), capacity.get(token)
        )
        for token, raw in zip(tokens, infos, strict=True)
    ]
    rows.sort(key=lambda r: (r.stale, r.key))
    return rows
