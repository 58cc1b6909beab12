"""The rolling 24-hour sending quota of an SES account, counted fleet-wide in Redis.

SES counts recipients over a rolling window (24 h). We count them in one Redis hash per
account: a counter per time bucket (``window_s / buckets``; one minute by default) and a
running total, so a day of a million recipients costs ``buckets + 1`` small fields, not one
entry per recipient. ``try_consume(n)`` is one atomic Lua check-and-add on the Redis
server's clock. A bucket counts until all of it is older than the window, so our window is
never shorter than SES's (it may be up to one bucket longer: conservative).

When SES itself says "Daily message quota exceeded" (its count may include senders we do
not see), ``mark_exhausted()`` stops the account for everybody until capacity frees; every
``try_consume`` answers not granted, with ``retry_after_s``, until then.

Keys: ``<key_prefix>:quota:{<account>}`` (one hash), in the same Cluster slot as the
account's rate limiter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis as redis_sync
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import RedisCluster as AsyncRedisCluster

from ses_tasks.errors import ConfigurationError, SesTasksError
from ses_tasks.limits.ratelimit import SYNC_CLIENTS, check_account, check_weight, load_lua

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_WINDOW_S",
    "DailyQuota",
    "QuotaDecision",
    "QuotaStatus",
    "QuotaUnavailableError",
]

#: SES's sending quota is a rolling 24 hours.
DEFAULT_WINDOW_S = 86400.0
#: Buckets per window: one-minute buckets for 24 hours.
DEFAULT_BUCKETS = 1440
#: What we store when SES gives no other reason.
DEFAULT_EXHAUSTED_REASON = "Daily message quota exceeded"


class QuotaUnavailableError(SesTasksError, ConnectionError):
    """Redis could not be reached or refused a quota script; nothing was counted."""


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    granted: bool
    #: Recipients counted in the window (including these ``n`` when granted).
    used: int
    limit: int | None
    #: When not granted: seconds until enough capacity frees (``math.inf``: never, ``n`` is
    #: larger than the limit). 0 when granted.
    retry_after_s: float


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    used: int
    limit: int | None
    window_s: float
    #: Unix time (server clock) until which SES told us to stop, or None.
    exhausted_until: float | None
    reason: str | None

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DailyQuota:
    """The account's rolling quota, for asyncio code. ``limit=None``: unlimited, still counted.

    Scripts are registered once per instance; redis-py re-loads them on NOSCRIPT.
    """

    _script_names = ("consume", "release", "exhaust", "status")

    def __init__(
        self,
        redis: AsyncRedis | AsyncRedisCluster,
        *,
        key_prefix: str = "sestasks",
        account: str = "default",
        limit: int | None,
        window_s: float = DEFAULT_WINDOW_S,
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        if isinstance(redis, SYNC_CLIENTS):
            raise ConfigurationError(
                "redis", "DailyQuota needs a redis.asyncio client, not a synchronous one"
            )
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ConfigurationError("limit", "must be a whole number >= 0, or None (unlimited)")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigurationError("window_s", "must be a positive number of seconds")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= 100_000:
            raise ConfigurationError("buckets", "must be a whole number in [1, 100000]")
        self.account = check_account(account)
        self.key = f"{key_prefix}:quota:{{{self.account}}}"
        self.limit = limit
        self.window_s = float(window_s)
        self.buckets = buckets
        self.bucket_us = self.window_s * 1e6 / buckets
        self.ttl_ms = math.ceil((self.window_s * 1e6 + 2 * self.bucket_us) / 1000) + 1000
        #: Server-time override (integer microseconds) for tests; None = Redis ``TIME``.
        self._now_us: Callable[[], int] | None = None
        self._redis = redis
        self._lua = {
            name: redis.register_script(load_lua("quota_common.lua", f"quota_{name}.lua"))
            for name in self._script_names
        }

    @classmethod
    def from_settings(
        cls,
        redis: AsyncRedis | AsyncRedisCluster,
        settings: Settings,
        *,
        account: str | None = None,
    ) -> DailyQuota:
        """The quota for ``settings`` (account defaults to the SES region)."""
        return cls(
            redis,
            key_prefix=settings.key_prefix,
            account=account or settings.region,
            limit=settings.max_24h_send,
            window_s=settings.quota_window_s,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} account={self.account!r} limit={self.limit} "
            f"window={self.window_s:g}s>"
        )

    def _now_arg(self) -> str:
        return "" if self._now_us is None else str(int(self._now_us()))

    def _consume_args(self, n: int) -> list[str]:
        limit = -1 if self.limit is None else self.limit
        return [
            self._now_arg(),
            str(n),
            str(limit),
            repr(self.bucket_us),
            str(self.buckets),
            str(self.ttl_ms),
        ]

    def _decision(self, raw: Sequence[Any]) -> QuotaDecision:
        granted, used, retry_us, _why = (_s(v) for v in raw)
        retry = int(retry_us)
        return QuotaDecision(
            granted=granted == "1",
            used=int(used),
            limit=self.limit,
            retry_after_s=math.inf if retry < 0 else retry / 1e6,
        )

    def _release_args(self, n: int) -> list[str]:
        return [self._now_arg(), str(n), repr(self.bucket_us), str(self.buckets)]

    def _exhaust_args(self, retry_after_s: float | None, reason: str) -> list[str]:
        if retry_after_s is not None and not (math.isfinite(retry_after_s) and retry_after_s >= 0):
            raise ConfigurationError("retry_after_s", "must be a finite number >= 0, or None")
        retry = "-1" if retry_after_s is None else repr(retry_after_s * 1e6)
        return [
            self._now_arg(),
            retry,
            reason[:200],
            repr(self.bucket_us),
            str(self.buckets),
            str(self.ttl_ms),
        ]

    def _status_args(self) -> list[str]:
        return [self._now_arg(), repr(self.bucket_us), str(self.buckets)]

    def _status(self, raw: Sequence[Any]) -> QuotaStatus:
        used, until_us, why, _now = (_s(v) for v in raw)
        return QuotaStatus(
            used=int(used),
            limit=self.limit,
            window_s=self.window_s,
            exhausted_until=int(until_us) / 1e6 if until_us else None,
            reason=why or None,
        )

    def _unavailable(self, exc: Exception) -> QuotaUnavailableError:
        return QuotaUnavailableError(
            f"quota store unavailable for {self.account}: {type(exc).__name__}"
        )

    async def _call(self, name: str, args: list[str]) -> Sequence[Any]:
        try:
            return cast("Sequence[Any]", await self._lua[name](keys=[self.key], args=args))
        except redis_sync.RedisError as exc:
            raise self._unavailable(exc) from exc

    async def try_consume(self, n: int) -> QuotaDecision:
        """Count ``n`` recipients if the window has room (and SES has not said stop)."""
        check_weight(n)
        return self._decision(await self._call("consume", self._consume_args(n)))

    async def release(self, n: int) -> int:
        """Uncount up to ``n`` recipients that never reached SES; returns how many."""
        check_weight(n)
        return int(_s((await self._call("release", self._release_args(n)))[0]))

    async def mark_exhausted(
        self, retry_after_s: float | None = None, *, reason: str = DEFAULT_EXHAUSTED_REASON
    ) -> float:
        """SES said the daily quota is used up: stop the account; returns the retry delay.

        Without ``retry_after_s`` we estimate it: until the oldest recipients we counted
        leave the window (or one bucket if we counted none). A longer earlier mark is kept.
        """
        until_us, now_us = (
            int(_s(v))
            for v in await self._call("exhaust", self._exhaust_args(retry_after_s, reason))
        )
        return (until_us - now_us) / 1e6

    async def status(self) -> QuotaStatus:
        return self._status(await self._call("status", self._status_args()))
