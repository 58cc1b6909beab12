"""Fleet-wide send rate in Redis: one GCRA limiter per SES account, shared by every worker.

SES enforces one maximum send rate (recipients per second) per account and region, across
every connection and machine; Celery's ``rate_limit`` is per worker, so a fleet using it
overshoots. Here every worker asks one Lua script in Redis, which keeps the schedule on the
Redis server's clock (``TIME``), so clock skew between machines does not matter.

Reservation, not polling
    ``acquire(n)`` costs one round trip: the script *reserves* ``n`` tokens (advances the
    theoretical arrival time, TAT) and answers how long to wait; the caller sleeps exactly
    that long and sends. A batch of 100 recipients pays one round trip, not 100. ``n``
    larger than the burst works: it waits about ``n / rate``. A waiting caller that is
    cancelled gives its tokens back if nobody reserved after it.

Limits (GCRA)
    ``interval = 1 / effective_rate``. A request of ``n`` is sent at
    ``max(TAT, now) + n * interval - tolerance`` (or now, if that is earlier); over any
    span ``L`` the fleet sends at most ``rate * L + burst`` recipients. Tolerances are in
    time, fixed by the *configured* rate: ``tolerance_tx = burst / rate`` and
    ``tolerance_bulk = (1 - transactional_reserve) * tolerance_tx``. When the adaptive
    factor lowers the rate, the burst in recipients shrinks with it.

Priorities
    Bulk may burst only ``(1 - transactional_reserve) * burst``; transactional may use the
    whole burst. A saturating campaign therefore keeps ``TAT ~ now + tolerance_bulk`` and a
    password-reset mail finds ``reserve * burst`` tokens of headroom at once. Sustained
    transactional traffic pushes TAT forward, which slows bulk (strict priority); with no
    transactional traffic bulk gets the full rate.

    Reservations are promises that cannot be taken back, so to keep the priority bulk may
    reserve only while ``TAT - now <= tolerance_bulk + bulk_lookahead_s``. A transactional
    request thus waits at most ``bulk_lookahead_s + (n_bulk + n_tx) / rate - reserve *
    burst / rate`` (zero while bulk is below its burst). A bulk request beyond the
    lookahead reserves nothing: the first time it gets a place at the end of a virtual line
    and the time to come back; coming back it reserves (or, if transactional traffic
    pushed TAT meanwhile, gets the time until bulk fits again). Waiting bulk callers so
    return one after another, not all at once: one round trip per acquire below the rate,
    two at saturation (measured 1.98), never a poll loop. ``reserve()`` always reserves and
    so bypasses the line: use it only when you schedule sends yourself.

Adaptive rate (AIMD)
    The effective rate is ``configured * factor`` with the factor in Redis, shared by the
    fleet. ``on_throttle()`` (SES answered 454 "Maximum sending rate exceeded") multiplies
    it by ``decrease_factor`` down to ``min_rate_per_s``, at most once per
    ``throttle_guard_s`` so that one burst of 454s seen by many workers counts once. Every
    ``recover_interval_s`` since the last change adds ``recover_per_s * recover_interval_s``
    recipients/s back, up to the configured rate; the acquire script applies it lazily from
    server time, so no background job is needed. Each change is logged at INFO (old and
    new rate) by the worker whose call made it, shown by ``status()``, and kept in a list
    of the last ``CHANGES_KEPT`` changes (``recent_changes()``), written by the same script
    that made the change. Workers should share one configuration per account: the
    configured rate travels with each call.

Keys: ``<key_prefix>:rate:{<account>}`` (one hash) and ``...:changes`` (the change list).
The ``{account}`` hash tag puts them in the same Redis Cluster slot as the account's quota
(``ses_tasks.limits.quota``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import redis as redis_sync
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import RedisCluster as AsyncRedisCluster

from ses_tasks.errors import ConfigurationError, SesTasksError, ValidationError

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "CHANGES_KEPT",
    "DEFAULT_BULK_LOOKAHEAD_S",
    "DEFAULT_DECREASE_FACTOR",
    "DEFAULT_MIN_RATE_SHARE",
    "DEFAULT_RECOVER_SHARE_PER_S",
    "FleetRateLimiter",
    "LimiterStatus",
    "LimiterUnavailableError",
    "Priority",
    "RateChange",
    "RateLimitWaitExceeded",
    "YieldRequested",
    "load_lua",
    "parse_change",
]

log = logging.getLogger(__name__)

#: How far ahead of its tolerance bulk may reserve; bounds a transactional request's wait.
DEFAULT_BULK_LOOKAHEAD_S = 0.02
#: On a 454 throttle the fleet's rate is multiplied by this.
DEFAULT_DECREASE_FACTOR = 0.5
#: Floor of the adaptive rate, as a share of the configured rate.
DEFAULT_MIN_RATE_SHARE = 0.1
#: Additive recovery per second, as a share of the configured rate.
DEFAULT_RECOVER_SHARE_PER_S = 0.05
#: A burst of 454s within this time counts as one throttle.
DEFAULT_THROTTLE_GUARD_S = 1.0
#: Recovery is applied in steps of this length (one log line per step at most).
DEFAULT_RECOVER_INTERVAL_S = 1.0
#: A yield request nobody answers within this long (no batch of that campaign asked for
#: tokens) is dropped, so it never stops an unrelated later batch.
YIELD_STANDS_S = 5.0
#: Minimum life of the limiter's key once idle (it keeps the adaptive factor).
MIN_STATE_TTL_S = 60.0
#: Rate changes kept per account (the Lua prelude's CHANGES_KEPT).
CHANGES_KEPT = 50

#: Synchronous clients, refused: the limiter and the quota talk to Redis with asyncio only.
SYNC_CLIENTS = (redis_sync.Redis, redis_sync.RedisCluster)
_ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


@functools.cache
def load_lua(*names: str) -> str:
    """Concatenate package-data scripts (a shared prelude first, then the script)."""
    lua = resources.files("ses_tasks.limits").joinpath("lua")
    return "\n".join(lua.joinpath(name).read_text(encoding="utf-8") for name in names)


def check_account(account: str) -> str:
    if not _ACCOUNT_RE.match(account):
        raise ConfigurationError("account", "use 1-128 letters, digits or '_.:@-' (no braces)")
    return account


def check_weight(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValidationError("n", f"must be a positive whole number of recipients, not {n!r}")
    return n


class Priority(StrEnum):
    #: A single message a person is waiting for (password reset, receipt): uses the reserve.
    TRANSACTIONAL = "transactional"
    #: Campaign traffic: yields to transactional traffic, uses the full rate when it is idle.
    BULK = "bulk"


class LimiterUnavailableError(SesTasksError, ConnectionError):
    """Redis could not be reached or refused a limiter script; nothing was reserved."""


class YieldRequested(SesTasksError):
    """The dispatcher asked this batch to stop and hand its rest back (nothing reserved)."""


class RateLimitWaitExceeded(SesTasksError, TimeoutError):
    """Sending now would need a longer wait than ``max_wait_s``; nothing was reserved."""

    def __init__(self, wait_s: float, max_wait_s: float) -> None:
        self.wait_s = wait_s
        self.max_wait_s = max_wait_s
        super().__init__(wait_s, max_wait_s)

    def __str__(self) -> str:
        return f"rate limit needs a {self.wait_s:.3f} s wait, more than {self.max_wait_s:.3f} s"


@dataclass(frozen=True, slots=True)
class LimiterStatus:
    account: str
    configured_rate_per_s: float
    effective_rate_per_s: float
    #: Configured burst (recipients); the current burst is ``burst * effective / configured``.
    burst: float
    transactional_reserve: float
    #: Recipients a transactional request could take right now without waiting.
    tokens_available: float
    #: Recipients a bulk request could take right now without waiting.
    bulk_tokens_available: float
    #: Unix time (server clock) of the last rate change, or None if it never changed.
    last_change_at: float | None
    #: ``"throttle"`` or ``"recover"``, or None.
    last_change_reason: str | None
    previous_rate_per_s: float | None


@dataclass(frozen=True, slots=True)
class RateChange:
    """One change of an account's effective rate, as recorded by the script that made it."""

    #: Unix time (server clock).
    at: float
    account: str
    old_rate_per_s: float
    new_rate_per_s: float
    #: ``"throttle"`` (SES said 454) or ``"recover"`` (additive step back up).
    why: str


def parse_change(raw: Any) -> RateChange | None:
    """One entry of the change list; None if it is not one (never raises)."""
    try:
        data = json.loads(_s(raw))
        return RateChange(
            at=int(data["at_us"]) / 1e6,
            account=str(data["account"]),
            old_rate_per_s=float(data["old_rate"]),
            new_rate_per_s=float(data["new_rate"]),
            why=str(data["why"]),
        )
    except (TypeError, ValueError, KeyError):
        return None


@dataclass(frozen=True, slots=True)
class _Grant:
    status: str
    wait_s: float
    field: str
    stored: str
    previous: str


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FleetRateLimiter:
    """The fleet-wide limiter, for asyncio code. See the module docstring.

    Scripts are registered once per instance; redis-py re-loads them on NOSCRIPT, so the
    limiter keeps working after a Redis restart or ``SCRIPT FLUSH``.
    """

    _script_names = ("acquire", "refund", "throttle", "status", "shares", "yield")

    def __init__(
        self,
        redis: AsyncRedis | AsyncRedisCluster,
        *,
        key_prefix: str = "sestasks",
        account: str = "default",
        rate_per_s: float,
        burst: float | None = None,
        transactional_reserve: float = 0.2,
        decrease_factor: float = DEFAULT_DECREASE_FACTOR,
        recover_per_s: float | None = None,
        min_rate_per_s: float | None = None,
        bulk_lookahead_s: float = DEFAULT_BULK_LOOKAHEAD_S,
        throttle_guard_s: float = DEFAULT_THROTTLE_GUARD_S,
    ) -> None:
        if isinstance(redis, SYNC_CLIENTS):
            raise ConfigurationError(
                "redis", "FleetRateLimiter needs a redis.asyncio client, not a synchronous one"
            )
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ConfigurationError("rate_per_s", "must be a positive number")
        burst = max(1.0, rate_per_s) if burst is None else burst
        if not (math.isfinite(burst) and burst > 0):
            raise ConfigurationError("burst", "must be a positive number")
        if not 0 <= transactional_reserve < 1:
            raise ConfigurationError("transactional_reserve", "must be in [0, 1)")
        if not 0 < decrease_factor < 1:
            raise ConfigurationError("decrease_factor", "must be in (0, 1)")
        recover = (
            rate_per_s * DEFAULT_RECOVER_SHARE_PER_S if recover_per_s is None else recover_per_s
        )
        if not (math.isfinite(recover) and recover >= 0):
            raise ConfigurationError("recover_per_s", "must be >= 0")
        floor = rate_per_s * DEFAULT_MIN_RATE_SHARE if min_rate_per_s is None else min_rate_per_s
        if not 0 < floor <= rate_per_s:
            raise ConfigurationError("min_rate_per_s", "must be > 0 and <= rate_per_s")
        if not (math.isfinite(bulk_lookahead_s) and bulk_lookahead_s >= 0):
            raise ConfigurationError("bulk_lookahead_s", "must be >= 0")
        if not (math.isfinite(throttle_guard_s) and throttle_guard_s >= 0):
            raise ConfigurationError("throttle_guard_s", "must be >= 0")
        self.account = check_account(account)
        self.key = f"{key_prefix}:rate:{{{self.account}}}"
        #: The last CHANGES_KEPT rate changes, oldest first (JSON objects).
        self.changes_key = f"{self.key}:changes"
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.transactional_reserve = float(transactional_reserve)
        self.decrease_factor = float(decrease_factor)
        self.recover_per_s = float(recover)
        self.min_rate_per_s = float(floor)
        self.bulk_lookahead_s = float(bulk_lookahead_s)
        self.throttle_guard_s = float(throttle_guard_s)
        self.tolerance_tx_us = self.burst / self.rate_per_s * 1e6
        self.tolerance_bulk_us = self.tolerance_tx_us * (1 - self.transactional_reserve)
        self.recover_interval_us = DEFAULT_RECOVER_INTERVAL_S * 1e6
        self.step = self.recover_per_s / self.rate_per_s * DEFAULT_RECOVER_INTERVAL_S
        full_recovery_s = (
            (1 - self.min_rate_per_s / self.rate_per_s) / self.step * DEFAULT_RECOVER_INTERVAL_S
            if self.step > 0
            else 0.0
        )
        self.ttl_ms = math.ceil(max(MIN_STATE_TTL_S, 2 * full_recovery_s) * 1000)
        self._acquire_config = (
            repr(self.rate_per_s),
            repr(self.tolerance_tx_us),
            repr(self.tolerance_bulk_us),
            repr(self.bulk_lookahead_s * 1e6),
        )
        self._recovery_config = (repr(self.step), repr(self.recover_interval_us), str(self.ttl_ms))
        #: Server-time override (integer microseconds) for tests; None = Redis ``TIME``.
        self._now_us: Callable[[], int] | None = None
        #: Script calls made (one Redis round trip each, unless a NOSCRIPT reload happened).
        self.round_trips = 0
        self._redis = redis
        self._lua = {
            name: redis.register_script(load_lua("ratelimit_common.lua", f"ratelimit_{name}.lua"))
            for name in self._script_names
        }
        self._sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep

    @classmethod
    def from_settings(
        cls,
        redis: AsyncRedis | AsyncRedisCluster,
        settings: Settings,
        *,
        account: str | None = None,
    ) -> FleetRateLimiter:
        """The limiter for ``settings`` (account defaults to the SES region)."""
        return cls(
            redis,
            key_prefix=settings.key_prefix,
            account=account or settings.region,
            rate_per_s=settings.max_send_rate,
            burst=settings.burst,
            transactional_reserve=settings.transactional_reserve,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} account={self.account!r} rate={self.rate_per_s:g}/s "
            f"burst={self.burst:g} reserve={self.transactional_reserve:g}>"
        )

    def _now_arg(self) -> str:
        return "" if self._now_us is None else str(int(self._now_us()))

    def _acquire_args(
        self, n: int, priority: Priority, max_wait_s: float | None, mode: str, campaign: str = ""
    ) -> list[str]:
        return [
            self._now_arg(),
            str(n),
            *self._acquire_config,
            "t" if priority == Priority.TRANSACTIONAL else "b",
            "-1" if max_wait_s is None else repr(max(0.0, max_wait_s) * 1e6),
            mode,
            *self._recovery_config,
            campaign,
            self.account,
        ]

    def _grant(self, raw: Sequence[Any]) -> _Grant:
        st, wait_us, field, stored, previous, changed, old_f, f = (_s(v) for v in raw)
        self._log_change(changed, old_f, f, "recover")
        return _Grant(st, int(wait_us) / 1e6, field, stored, previous)

    def _throttle_args(self) -> list[str]:
        return [
            self._now_arg(),
            repr(self.decrease_factor),
            repr(self.min_rate_per_s / self.rate_per_s),
            repr(self.throttle_guard_s * 1e6),
            repr(self.step),
            repr(self.recover_interval_us),
            str(self.ttl_ms),
            repr(self.rate_per_s),
            self.account,
        ]

    def _throttled(self, raw: Sequence[Any]) -> float:
        changed, old_f, f, recovered, pre = (_s(v) for v in raw)
        self._log_change(recovered, pre, old_f, "recover")
        self._log_change(changed, old_f, f, "throttle")
        if changed != "1":
            log.debug(
                "throttle on %s ignored: rate changed less than %.1f s ago",
                self.account,
                self.throttle_guard_s,
            )
        return self.rate_per_s * float(f)

    def _status_args(self) -> list[str]:
        return [
            self._now_arg(),
            repr(self.step),
            repr(self.recover_interval_us),
            repr(self.rate_per_s),
            self.account,
        ]

    def _status(self, raw: Sequence[Any]) -> LimiterStatus:
        now_us, f_s, changed, old_f, tat_s, reason, at, prev = (_s(v) for v in raw)
        self._log_change(changed, old_f, f_s, "recover")
        now, f = int(now_us), float(f_s)
        interval_us = 1e6 / (self.rate_per_s * f)
        ahead_us = max(0, int(tat_s) - now) if tat_s else 0

        def tokens(tolerance_us: float) -> float:
            return max(0.0, (tolerance_us - ahead_us) / interval_us)

        return LimiterStatus(
            account=self.account,
            configured_rate_per_s=self.rate_per_s,
            effective_rate_per_s=self.rate_per_s * f,
            burst=self.burst,
            transactional_reserve=self.transactional_reserve,
            tokens_available=tokens(self.tolerance_tx_us),
            bulk_tokens_available=tokens(self.tolerance_bulk_us),
            last_change_at=int(at) / 1e6 if at else None,
            last_change_reason=reason or None,
            previous_rate_per_s=self.rate_per_s * float(prev) if prev else None,
        )

    def _log_change(self, changed: str, old_f: str, new_f: str, reason: str) -> None:
        if changed == "1":
            log.info(
                "fleet send rate for %s: %.3f/s -> %.3f/s (%s; configured %.3f/s)",
                self.account,
                self.rate_per_s * float(old_f),
                self.rate_per_s * float(new_f),
                reason,
                self.rate_per_s,
            )

    def _unavailable(self, exc: Exception) -> LimiterUnavailableError:
        return LimiterUnavailableError(
            f"rate limiter store unavailable for {self.account}: {type(exc).__name__}"
        )

    async def _call(self, name: str, args: list[str]) -> Sequence[Any]:
        self.round_trips += 1
        try:
            return cast(
                "Sequence[Any]", await self._lua[name](keys=[self.key, self.changes_key], args=args)
            )
        except redis_sync.RedisError as exc:
            raise self._unavailable(exc) from exc

    async def _refund(self, grant: _Grant) -> None:
        try:
            await self._call("refund", [grant.field, grant.stored, grant.previous])
        except LimiterUnavailableError:
            log.debug("could not refund a cancelled reservation on %s", self.account)

    async def _wait(self, grant: _Grant) -> None:
        try:
            await self._sleep(grant.wait_s)
        except asyncio.CancelledError:
            await asyncio.shield(self._refund(grant))
            raise

    async def acquire(
        self,
        n: int = 1,
        *,
        priority: Priority = Priority.BULK,
        max_wait_s: float | None = None,
        campaign: str = "",
    ) -> float:
        """Wait until ``n`` recipients may be sent; returns the seconds waited.

        Raises ``RateLimitWaitExceeded`` (nothing reserved) if that would take longer than
        ``max_wait_s``. Cancelling the wait gives the reservation back when it is still the
        last one.
        """
        check_weight(n)
        start = time.monotonic()
        mode = "fresh"
        while True:
            left = None if max_wait_s is None else max_wait_s - (time.monotonic() - start)
            grant = self._grant(
                await self._call("acquire", self._acquire_args(n, priority, left, mode, campaign))
            )
            if grant.status == "yield":
                raise YieldRequested(f"campaign {campaign} asked to make room")
            if grant.status == "long":
                raise RateLimitWaitExceeded(
                    grant.wait_s + time.monotonic() - start, cast(float, max_wait_s)
                )
            if grant.wait_s > 0:
                await self._wait(grant)
            if grant.status == "ok":
                return time.monotonic() - start
            mode = "again"

    async def reserve(self, n: int, *, priority: Priority = Priority.BULK) -> float:
        """Reserve ``n`` recipients in one round trip and return the wait (no sleep).

        Always reserves, even bulk beyond its lookahead: the caller must send no earlier
        than the returned delay from now.
        """
        check_weight(n)
        grant = self._grant(
            await self._call("acquire", self._acquire_args(n, priority, None, "force"))
        )
        return grant.wait_s

    async def set_shares(self, shares: dict[str, float]) -> None:
        """Each sending campaign's share of the rate (from the dispatcher; {} = no split).

        Bulk callers naming a campaign with a share below 1 also pass that campaign's own
        GCRA at ``share * rate``, so one campaign's many batches cannot crowd out another's
        few. Shares not refreshed for 10 s are ignored.
        """
        args = [self._now_arg(), str(self.ttl_ms)]
        for campaign, share in shares.items():
            args += [campaign, repr(float(share))]
        await self._call("shares", args)

    async def request_yield(self, campaign: str) -> None:
        """Ask one running batch of ``campaign`` to stop at its next chunk and hand the rest
        back (its next bulk ``acquire`` raises ``YieldRequested``)."""
        args = [self._now_arg(), campaign, repr(YIELD_STANDS_S * 1e6), str(self.ttl_ms)]
        await self._call("yield", args)

    async def on_throttle(self) -> float:
        """SES said 454 Maximum sending rate exceeded: slow the fleet; returns the new rate."""
        return self._throttled(await self._call("throttle", self._throttle_args()))

    async def status(self) -> LimiterStatus:
        return self._status(await self._call("status", self._status_args()))

    async def recent_changes(self, limit: int = CHANGES_KEPT) -> list[RateChange]:
        """The last ``limit`` changes of the effective rate, newest first (one LRANGE)."""
        if limit < 1:
            return []
        try:
            raw = await self._redis.lrange(self.changes_key, -limit, -1)
        except redis_sync.RedisError as exc:
            raise self._unavailable(exc) from exc
        return [c for c in map(parse_change, reversed(raw)) if c is not None]
