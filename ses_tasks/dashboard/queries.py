"""The Redis reads behind the campaign pages: each costs what one page shows, not what the
campaign holds.

A campaign's counts come from its hash (the store keeps per-state counters), its rate from
the timeline's last buckets, its failures a page at a time from the not-sent set: an SSCAN
from a cursor, then one pipeline of HGETALLs for that page's records. The set has no order
to page by offset, so a page is addressed by where its first row is: the SSCAN cursor of the
reply that holds it and how many rows of that reply came before (``PageToken``). With the
set unchanged the same cursor gives the same reply, so pages are stable; while the campaign
runs a row may move between pages, as SSCAN allows.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from ses_tasks.errors import ValidationError
from ses_tasks.keys import CAMPAIGN_ID_RE, Keys
from ses_tasks.states import FINAL_STATES, CampaignState
from ses_tasks.store.timeline import BUCKET_S, TimelinePoint, rate_now, rates_now, read_timeline
from ses_tasks.store.tracking import CampaignStatus, MessageRecord, parse_campaign, parse_message

__all__ = [
    "CHART_SPAN_S",
    "LIST_LIMIT",
    "CampaignView",
    "FailureRow",
    "FailuresPage",
    "PageToken",
    "campaign_timeline",
    "failures_page",
    "get_campaign",
    "iter_failures",
    "recent_campaigns",
]

#: The campaigns list shows at most this many, most recent first.
LIST_LIMIT = 50
#: Rows on one page of the failures table.
PAGE_SIZE = 50
#: The chart shows at most this much of a campaign's history (its last minutes).
CHART_SPAN_S = 15 * 60
#: ``rate now`` averages this many seconds of complete buckets.
RATE_WINDOW_S = 30
#: SSCAN calls one page may make before it stops (a sparse set still answers quickly).
MAX_SCANS_PER_PAGE = 200
_FINAL = tuple(s.value for s in FINAL_STATES)
_FEEDBACK_FIELDS = ("hard_bounced", "complained")
_TOKEN_RE = re.compile(r"^(\d{1,20})\.(\d{1,6})$")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class CampaignView:
    """One campaign as a page shows it."""

    status: CampaignStatus
    #: Messages sent per second over the last complete buckets.
    rate: float = 0.0
    #: Permanent bounces and complaints recorded by feedback.
    hard_bounced: int = 0
    complained: int = 0

    @property
    def id(self) -> str:
        return self.status.id

    @property
    def final(self) -> int:
        return sum(self.status.counts.get(s, 0) for s in _FINAL)

    @property
    def percent(self) -> int:
        """Whole percent of messages final (100 only when all are)."""
        total = self.status.total
        return min(100, self.final * 100 // total) if total > 0 else 0

    @property
    def sent(self) -> int:
        return self.status.counts.get("sent", 0)

    @property
    def shown_state(self) -> str:
        """The state as people read it: a campaign waiting for its ``send_at`` is
        "scheduled", not "running"."""
        return "scheduled" if self.status.scheduled else self.status.state.value

    @property
    def eta_s(self) -> float | None:
        """Seconds until every open message is final at the current rate; None if unknown."""
        remaining = self.status.open
        if remaining <= 0 or self.rate <= 0 or self.status.state is not CampaignState.RUNNING:
            return None
        return remaining / self.rate

    @property
    def bounce_rate(self) -> float:
        return self.hard_bounced / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complained / self.sent if self.sent else 0.0

    def to_json(self) -> dict[str, Any]:
        s = self.status
        return {
            "id": s.id,
            "state": self.shown_state,
            "stored_state": s.state.value,
            "reason": s.reason,
            "scheduled": s.scheduled,
            "total": s.total,
            "counts": dict(s.counts),
            "final": self.final,
            "percent": self.percent,
            "sent": self.sent,
            "rate": round(self.rate, 3),
            "rate_text": format_rate(self.rate),
            "eta_s": self.eta_s,
            "eta_text": format_eta(self),
            "weight": s.meta.get("weight", ""),
            "profile": s.meta.get("profile", ""),
            "hard_bounced": self.hard_bounced,
            "complained": self.complained,
            "bounce_rate": self.bounce_rate,
            "complaint_rate": self.complaint_rate,
        }


def format_rate(rate: float) -> str:
    return f"{rate:.1f}/s"


def format_eta(view: CampaignView) -> str:
    if view.status.state is CampaignState.COMPLETED:
        return "done"
    if view.status.scheduled and view.status.send_at is not None:
        starts = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(view.status.send_at))
        return f"starts {starts}"
    eta = view.eta_s
    if eta is None:
        return "—"
    seconds = math.ceil(eta)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _sending(status: CampaignStatus, now: float) -> bool:
    """Whether outcomes may have been recorded within the rate window (else rate is 0)."""
    if status.state in (CampaignState.RUNNING, CampaignState.PAUSED, CampaignState.ENQUEUEING):
        return True
    return status.finished_at is not None and now - status.finished_at < RATE_WINDOW_S + BUCKET_S


def _view(campaign_id: str, raw: dict[Any, Any], rate: float) -> CampaignView | None:
    status = parse_campaign(campaign_id, raw)
    if status is None:
        return None
    data = {_text(k): v for k, v in raw.items()}
    return CampaignView(
        status,
        rate,
        int(data.get("hard_bounced") or 0),
        int(data.get("complained") or 0),
    )


async def _rate(redis: aioredis.Redis, keys: Keys, status: CampaignStatus, now: float) -> float:
    if not _sending(status, now):
        return 0.0
    return await rate_now(redis, keys, status.id, window_s=RATE_WINDOW_S, now=now)


async def recent_campaigns(
    redis: aioredis.Redis, keys: Keys, *, limit: int = LIST_LIMIT, now: float | None = None
) -> list[CampaignView]:
    """The ``limit`` most recent campaigns: their ids, then their hashes in one pipeline,
    then the rate of those that may be sending (one more pipeline)."""
    now = time.time() if now is None else now
    ids = [_text(i) for i in await redis.zrevrange(keys.campaigns_index(), 0, limit - 1)]
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for campaign_id in ids:
        pipe.hgetall(keys.campaign(campaign_id))
    raws = await pipe.execute()
    views = [v for cid, raw in zip(ids, raws, strict=True) if (v := _view(cid, raw, 0.0))]
    sending = [v.id for v in views if _sending(v.status, now)]
    rates = await rates_now(redis, keys, sending, window_s=RATE_WINDOW_S, now=now)
    return [
        CampaignView(v.status, rates.get(v.id, 0.0), v.hard_bounced, v.complained) for v in views
    ]


async def get_campaign(
    redis: aioredis.Redis, keys: Keys, campaign_id: str, *, now: float | None = None
) -> CampaignView | None:
    """One campaign, or None when there is none by that id (or the id is not one)."""
    if not CAMPAIGN_ID_RE.match(campaign_id):
        return None
    now = time.time() if now is None else now
    view = _view(campaign_id, await redis.hgetall(keys.campaign(campaign_id)), 0.0)
    if view is None:
        return None
    rate = await _rate(redis, keys, view.status, now)
    return CampaignView(view.status, rate, view.hard_bounced, view.complained)


async def campaign_timeline(
    redis: aioredis.Redis, keys: Keys, status: CampaignStatus, *, now: float | None = None
) -> list[TimelinePoint]:
    """The campaign's last ``CHART_SPAN_S`` seconds of buckets (up to its end if it ended)."""
    now = time.time() if now is None else now
    end = now
    if status.state in (CampaignState.COMPLETED, CampaignState.CANCELLED) and status.finished_at:
        end = min(now, status.finished_at + BUCKET_S)
    start = status.created_at if status.created_at is not None else end - CHART_SPAN_S
    span = min(float(CHART_SPAN_S), max(float(BUCKET_S), end - start))
    return await read_timeline(redis, keys, status.id, since_s=span, now=end)


# Failures ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where a page starts: the SSCAN cursor of the reply holding its first row, and how
    many rows of that reply belong to earlier pages."""

    cursor: int = 0
    skip: int = 0

    def __str__(self) -> str:
        return f"{self.cursor}.{self.skip}"

    @classmethod
    def parse(cls, raw: str | None, *, name: str = "after") -> PageToken:
        if not raw:
            return cls()
        match = _TOKEN_RE.match(raw)
        if match is None or int(match.group(1)) >= 2**64:
            raise ValidationError(name, f"{raw[:40]!r} is not a page position")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True, slots=True)
class FailureRow:
    record: MessageRecord
    #: The recipient's display name, when known (see ``display_name``).
    name: str


@dataclass(frozen=True, slots=True)
class FailuresPage:
    rows: list[FailureRow]
    start: PageToken
    #: Where the next page starts; None on the last page.
    next: PageToken | None
    #: Messages not sent, in all (SCARD).
    total: int = 0
    ids: list[str] = field(default_factory=list)


def display_name(record: MessageRecord) -> str:
    """The recipient's name: the ``name`` variable of its stored recipient row (kept for
    failed and unknown messages, for retry-failed), else the display-name part of the
    address (``Jane <jane@example.com>``), else ''."""
    row = record.row
    variables: Any = None
    if isinstance(row, list) and len(row) > 2:  # a batch item: [seq, email, variables, ...]
        variables = row[2]
    elif isinstance(row, dict):
        variables = row
    if isinstance(variables, dict):
        name = variables.get("name")
        if isinstance(name, str | int | float) and str(name).strip():
            return str(name).strip()
    if record.email and "<" in record.email:
        name, _ = email.utils.parseaddr(record.email)
        return name
    return ""


async def _records(
    redis: aioredis.Redis, keys: Keys, message_ids: Sequence[str]
) -> list[MessageRecord]:
    if not message_ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for message_id in message_ids:
        pipe.hgetall(keys.message(message_id))
    out = []
    for message_id, raw in zip(message_ids, await pipe.execute(), strict=True):
        record = parse_message(message_id, raw)
        if record is not None:  # expired meanwhile
            out.append(record)
    return out


async def failures_page(
    redis: aioredis.Redis,
    keys: Keys,
    campaign_id: str,
    *,
    start: PageToken = PageToken(),
    size: int = PAGE_SIZE,
    scan_count: int = 100,
) -> FailuresPage:
    """One page of the campaign's messages not sent, starting at ``start``."""
    key = keys.not_sent(campaign_id)
    cursor, skip = start.cursor, start.skip
    ids: list[str] = []
    seen: set[str] = set()
    next_token: PageToken | None = None
    for _ in range(MAX_SCANS_PER_PAGE):
        new_cursor, members = await redis.sscan(key, cursor, count=scan_count)
        reply = [_text(m) for m in members]
        want = size - len(ids)
        rest = reply[skip:]
        if len(rest) > want:
            for mid in rest[:want]:
                if mid not in seen:
                    seen.add(mid)
                    ids.append(mid)
            next_token = PageToken(cursor, skip + want)
            break
        for mid in rest:
            if mid not in seen:  # SSCAN may repeat a member while the set grows
                seen.add(mid)
                ids.append(mid)
        cursor, skip = int(new_cursor), 0
        if cursor == 0:
            break
        if len(ids) >= size:
            next_token = PageToken(cursor, 0)
            break
    else:
        next_token = PageToken(cursor, 0)
    records = await _records(redis, keys, ids)
    total = int(await redis.scard(key))
    rows = [FailureRow(r, display_name(r)) for r in records]
    return FailuresPage(rows, start, next_token, total, ids)


async def iter_failures(
    redis: aioredis.Redis, keys: Keys, campaign_id: str, *, chunk: int = 500
) -> AsyncIterator[FailureRow]:
    """Every message not sent, ``chunk`` records in memory at a time (the CSV download).

    As ``StatusStore.not_sent``: a member SSCAN repeats while the set grows shows twice.
    """
    key = keys.not_sent(campaign_id)
    batch: list[str] = []
    async for member in redis.sscan_iter(key, count=chunk):
        batch.append(_text(member))
        if len(batch) >= chunk:
            for record in await _records(redis, keys, batch):
                yield FailureRow(record, display_name(record))
            batch = []
    for record in await _records(redis, keys, batch):
        yield FailureRow(record, display_name(record))
