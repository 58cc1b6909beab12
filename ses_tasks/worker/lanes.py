"""Sender profiles in a worker process: one lane each, so accounts never slow each other.

A lane is one profile's warm SMTP pool, its fleet-wide rate limiter with its own AIMD
state, and its 24-hour quota (Redis keys per account). A throttle or a used-up quota on
one account therefore never holds back another. Delivery sees a lane through ``LaneView``,
which is the process's ``DeliveryRuntime`` with that lane's pool, limiter and quota.

A profile may name a failover endpoint: while the first cannot be connected to at all
(refused, timed out, no route: nothing was said to it), sends go to the second for
``FAILOVER_HOLD_S``, then the first is tried again. Refusals, throttles and quota errors
never fail over: those are answers, and the other region would give the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ses_tasks.config import Settings
from ses_tasks.limits.quota import DailyQuota
from ses_tasks.limits.ratelimit import FleetRateLimiter
from ses_tasks.smtp.endpoint import make_tls_context
from ses_tasks.smtp.pool import PoolStats, SmtpPool
from ses_tasks.smtp.replies import SendResult

if TYPE_CHECKING:
    from ses_tasks.worker.runtime import WorkerRuntime

__all__ = ["FAILOVER_HOLD_S", "FailoverPool", "Lane", "LaneView", "account_of"]

log = logging.getLogger(__name__)

#: After the first endpoint was unreachable, sends go to the failover endpoint this long.
FAILOVER_HOLD_S = 30.0


def account_of(profile: str) -> str:
    """The limiter's and quota's account key of a profile ('' is the unnamed default)."""
    return f"profile-{profile}" if profile else "default"


def make_limiter(redis: Any, settings: Settings, profile: str) -> FleetRateLimiter:
    """The fleet-wide limiter of ``profile`` (``settings`` as that profile sends)."""
    return FleetRateLimiter(
        redis,
        key_prefix=settings.key_prefix,
        account=account_of(profile),
        rate_per_s=settings.max_send_rate,
        burst=settings.burst,
        transactional_reserve=settings.transactional_reserve,
    )


def make_quota(redis: Any, settings: Settings, profile: str) -> DailyQuota:
    """The 24-hour quota of ``profile`` (``settings`` as that profile sends)."""
    return DailyQuota(
        redis,
        key_prefix=settings.key_prefix,
        account=account_of(profile),
        limit=settings.max_24h_send,
        window_s=settings.quota_window_s,
    )


def make_pool(settings: Settings) -> SmtpPool:
    return SmtpPool(
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


class FailoverPool:
    """Two pools: the primary, and a second one while the primary is unreachable."""

    def __init__(self, primary: SmtpPool, secondary: SmtpPool, *, hold_s: float = FAILOVER_HOLD_S):
        self.primary = primary
        self.secondary = secondary
        self.hold_s = hold_s
        self._primary_down_until = 0.0
        self.failovers = 0

    def __repr__(self) -> str:
        return f"<FailoverPool {self.primary!r} -> {self.secondary!r}>"

    @property
    def stats(self) -> PoolStats:
        return self.primary.stats

    async def start(self) -> None:
        await self.primary.start()

    async def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        if time.monotonic() < self._primary_down_until:
            return await self._send_secondary(envelope_from, recipients, data)
        result = await self.primary.send(envelope_from, recipients, data)
        if not result.unreachable:
            return result
        if time.monotonic() >= self._primary_down_until:
            self.failovers += 1
            log.warning(
                "%s unreachable (%s); sending through %s for %.0f s",
                self.primary.endpoint.host,
                result.reason,
                self.secondary.endpoint.host,
                self.hold_s,
            )
        self._primary_down_until = time.monotonic() + self.hold_s
        return await self._send_secondary(envelope_from, recipients, data)

    async def _send_secondary(
        self, envelope_from: str, recipients: Sequence[str], data: bytes
    ) -> SendResult:
        result = await self.secondary.send(envelope_from, recipients, data)
        if result.unreachable:  # both down: try the primary again at the next send
            self._primary_down_until = 0.0
        return result

    async def close(self) -> None:
        try:
            await self.primary.close()
        finally:
            await self.secondary.close()


class Lane:
    """One sender profile's pool, limiter and quota in this process."""

    def __init__(self, name: str, settings: Settings, redis: Any, failover: Settings | None):
        self.name = name
        self.settings = settings
        self.limiter = make_limiter(redis, settings, name)
        self.quota = make_quota(redis, settings, name)
        primary = make_pool(settings)
        self.pool: SmtpPool | FailoverPool = (
            primary if failover is None else FailoverPool(primary, make_pool(failover))
        )


@dataclass(frozen=True, slots=True)
class LaneView:
    """The process's ``DeliveryRuntime`` as one lane sends."""

    rt: WorkerRuntime
    lane: Lane

    @property
    def settings(self) -> Settings:
        return self.lane.settings

    @property
    def token(self) -> str:
        return self.rt.token

    @property
    def store(self) -> Any:
        return self.rt.store

    @property
    def limiter(self) -> FleetRateLimiter:
        return self.lane.limiter

    @property
    def quota(self) -> DailyQuota:
        return self.lane.quota

    @property
    def pool(self) -> SmtpPool | FailoverPool:
        return self.lane.pool

    @property
    def templates(self) -> dict[str, Any]:
        return self.rt.templates

    @property
    def stopping(self) -> bool:
        return self.rt.stopping
