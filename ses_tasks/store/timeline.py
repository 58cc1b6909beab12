"""Per-campaign sends and failures over time, for the dashboard's chart and "rate now".

Recorded by the same script that records outcomes (``tracking_finish.lua``), in
``BUCKET_S``-second buckets held in one hash per campaign and hour
(``Keys.timeline(campaign_id, hour)``, fields ``<bucket start>:s`` and ``<bucket start>:f``),
each hash expiring ``KEEP_HOURS`` after its last write: the memory a campaign can hold here
is bounded whatever its size or length. Buckets are stamped with the recording worker's
clock, so workers' clocks should agree to well within ``BUCKET_S``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from ses_tasks.keys import CAMPAIGN_ID_RE, Keys

__all__ = [
    "BUCKET_S",
    "KEEP_HOURS",
    "TimelinePoint",
    "bucket_start",
    "rate_now",
    "rates_now",
    "read_timeline",
]

BUCKET_S = 5
KEEP_HOURS = 48
_HOUR_S = 3600
#: TTL of an hour's hash, renewed by every write to it.
_KEEP_S = KEEP_HOURS * _HOUR_S
_PER_HOUR = _HOUR_S // BUCKET_S  # buckets never straddle an hour: 3600 % BUCKET_S == 0


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """Outcomes recorded in the bucket starting at ``t`` (Unix seconds)."""

    t: float
    sent: int
    failed: int


def bucket_start(t: float) -> int:
    """Start (Unix s) of the bucket holding instant ``t``."""
    return int(t // BUCKET_S) * BUCKET_S


def _check_span(name: str, value: float, minimum: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not minimum <= value <= _KEEP_S:
        raise ValueError(f"{name} must be between {minimum:g} and {_KEEP_S} s, got {value!r}")


def _check_campaign(campaign_id: str) -> None:
    if not isinstance(campaign_id, str) or not CAMPAIGN_ID_RE.match(campaign_id):
        raise ValueError(f"campaign_id {campaign_id!r} is not a campaign id")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Window:
    """The reads for buckets ``first`` .. ``last`` (inclusive) of one campaign, queued on a
    pipeline that may carry other campaigns' windows too.

    An hour the window covers whole is read with HGETALL (only buckets that saw traffic
    come back); a partial hour with HMGET of its buckets (a short window stays cheap).
    """

    def __init__(self, keys: Keys, campaign_id: str, first: int, last: int) -> None:
        self.starts = range(first, last + BUCKET_S, BUCKET_S)
        self.hours: dict[int, list[int]] = {}
        for t in self.starts:
            self.hours.setdefault(t // _HOUR_S, []).append(t)
        self.keys = keys
        self.campaign_id = campaign_id

    def queue(self, pipe: Any) -> int:
        """Queue the reads; returns how many replies they take."""
        for hour, ts in self.hours.items():
            key = self.keys.timeline(self.campaign_id, hour)
            if len(ts) == _PER_HOUR:
                pipe.hgetall(key)
            else:
                pipe.hmget(key, [f"{t}:{kind}" for t in ts for kind in "sf"])
        return len(self.hours)

    def points(self, replies: list[Any]) -> list[TimelinePoint]:
        counts: dict[str, int] = {}
        for (_, ts), reply in zip(self.hours.items(), replies, strict=True):
            if isinstance(reply, dict):
                counts.update((_text(k), int(v)) for k, v in reply.items())
            else:
                fields = [f"{t}:{kind}" for t in ts for kind in "sf"]
                counts.update(
                    (f, int(v)) for f, v in zip(fields, reply, strict=True) if v is not None
                )
        return [
            TimelinePoint(float(t), counts.get(f"{t}:s", 0), counts.get(f"{t}:f", 0))
            for t in self.starts
        ]


async def _read_buckets(
    redis: aioredis.Redis, keys: Keys, campaign_id: str, first: int, last: int
) -> list[TimelinePoint]:
    """Points for the buckets starting at ``first`` .. ``last`` (inclusive), one round trip."""
    window = _Window(keys, campaign_id, first, last)
    pipe = redis.pipeline(transaction=False)
    window.queue(pipe)
    return window.points(await pipe.execute())


async def read_timeline(
    redis: aioredis.Redis,
    keys: Keys,
    campaign_id: str,
    *,
    since_s: float,
    now: float | None = None,
) -> list[TimelinePoint]:
    """Buckets from ``now - since_s`` to ``now``, oldest first, empty buckets included.

    The first point is the bucket holding ``now - since_s``, the last the bucket holding
    ``now`` (still filling). ``since_s`` is at most ``KEEP_HOURS`` hours: older buckets are
    gone. ``now`` defaults to this machine's clock.
    """
    _check_campaign(campaign_id)
    _check_span("since_s", since_s, 0)
    now = time.time() if now is None else now
    return await _read_buckets(
        redis, keys, campaign_id, bucket_start(now - since_s), bucket_start(now)
    )


def _rate_window(keys: Keys, campaign_id: str, window_s: float, now: float) -> _Window:
    """The complete buckets of the last ``window_s``: the bucket holding ``now`` is left
    out, it is still filling and would read low."""
    n = int(window_s // BUCKET_S)
    current = bucket_start(now)
    return _Window(keys, campaign_id, current - n * BUCKET_S, current - BUCKET_S)


def _rate(points: list[TimelinePoint], window_s: float) -> float:
    return sum(p.sent for p in points) / (int(window_s // BUCKET_S) * BUCKET_S)


async def rate_now(
    redis: aioredis.Redis,
    keys: Keys,
    campaign_id: str,
    *,
    window_s: float = 30,
    now: float | None = None,
) -> float:
    """Messages sent per second over the last ``window_s // BUCKET_S`` complete buckets."""
    rates = await rates_now(redis, keys, [campaign_id], window_s=window_s, now=now)
    return rates[campaign_id]


async def rates_now(
    redis: aioredis.Redis,
    keys: Keys,
    campaign_ids: list[str],
    *,
    window_s: float = 30,
    now: float | None = None,
) -> dict[str, float]:
    """``rate_now`` of many campaigns in one round trip (a page lists up to 50)."""
    for campaign_id in campaign_ids:
        _check_campaign(campaign_id)
    _check_span("window_s", window_s, BUCKET_S)
    now = time.time() if now is None else now
    windows = [_rate_window(keys, cid, window_s, now) for cid in campaign_ids]
    if not windows:
        return {}
    pipe = redis.pipeline(transaction=False)
    sizes = [w.queue(pipe) for w in windows]
    replies = await pipe.execute()
    rates: dict[str, float] = {}
    at = 0
    for window, size in zip(windows, sizes, strict=True):
        rates[window.campaign_id] = _rate(window.points(replies[at : at + size]), window_s)
        at += size
    return rates
