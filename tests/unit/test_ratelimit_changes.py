"""The limiter's record of its last rate changes (the dashboard's limits page reads it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import fakeredis
import pytest

from ses_tasks.limits.ratelimit import CHANGES_KEPT, FleetRateLimiter, Priority

T = TypeVar("T")
EPOCH_US = 1_700_000_000_000_000


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now_us = EPOCH_US

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += round(seconds * 1e6)


def limiter(clock: Clock, redis: fakeredis.FakeAsyncRedis | None = None) -> FleetRateLimiter:
    lim = FleetRateLimiter(
        redis or fakeredis.FakeAsyncRedis(),
        key_prefix="p",
        account="eu-1",
        rate_per_s=100.0,
        burst=10.0,
        recover_per_s=10.0,
    )
    lim._now_us = clock
    return lim


def test_throttle_and_recovery_are_recorded_newest_first() -> None:
    async def main() -> list[tuple[float, float, str, float]]:
        clock = Clock()
        lim = limiter(clock)
        await lim.on_throttle()  # 100 -> 50
        await lim.on_throttle()  # within the guard: no change, nothing recorded
        clock.advance(3.1)
        await lim.acquire(1, priority=Priority.BULK)  # three recovery steps: 50 -> 80
        changes = await lim.recent_changes()
        return [(c.old_rate_per_s, c.new_rate_per_s, c.why, c.at) for c in changes]

    changes = run(main())
    assert [c[:3] for c in changes] == [
        (pytest.approx(50.0), pytest.approx(80.0), "recover"),
        (100.0, 50.0, "throttle"),
    ]
    assert changes[1][3] == EPOCH_US / 1e6
    assert changes[0][3] == pytest.approx(EPOCH_US / 1e6 + 3.1)


def test_status_applies_and_records_recovery_with_the_account() -> None:
    async def main() -> list[tuple[str, str]]:
        clock = Clock()
        lim = limiter(clock)
        await lim.on_throttle()
        clock.advance(1.0)
        await lim.status()
        return [(c.account, c.why) for c in await lim.recent_changes()]

    assert run(main()) == [("eu-1", "recover"), ("eu-1", "throttle")]


def test_the_list_is_capped_and_lives_beside_the_limiter_in_one_slot() -> None:
    from redis.crc import key_slot

    async def main() -> tuple[int, int, int]:
        clock = Clock()
        redis = fakeredis.FakeAsyncRedis()
        lim = limiter(clock, redis)
        for _ in range(CHANGES_KEPT + 10):
            await lim.on_throttle()
            clock.advance(1.0)
        ttl = await redis.pttl(lim.changes_key)
        return len(await lim.recent_changes()), len(await lim.recent_changes(5)), ttl

    kept, five, ttl = run(main())
    assert kept == CHANGES_KEPT
    assert five == 5
    assert ttl > 86400 * 1000
    lim = limiter(Clock())
    assert lim.changes_key == "p:rate:{eu-1}:changes"
    assert key_slot(lim.changes_key.encode()) == key_slot(lim.key.encode())


def test_no_change_records_nothing() -> None:
    async def main() -> int:
        lim = limiter(Clock())
        await lim.acquire(1)
        await lim.status()
        return len(await lim.recent_changes())

    assert run(main()) == 0
