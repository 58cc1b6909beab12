"""Fleet limiter and rolling quota scripts on fakeredis (Lua), mostly on a controlled clock."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import fakeredis
import pytest

from ses_tasks.errors import ConfigurationError, SesTasksError, ValidationError
from ses_tasks.limits.quota import DailyQuota, QuotaUnavailableError
from ses_tasks.limits.ratelimit import (
    FleetRateLimiter,
    LimiterUnavailableError,
    Priority,
    RateLimitWaitExceeded,
)

T = TypeVar("T")
#: A round number of seconds, so quota buckets start at whole seconds.
EPOCH_US = 1_700_000_000_000_000
BULK, TX = Priority.BULK, Priority.TRANSACTIONAL


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class Clock:
    """Server time for the scripts; sleeping advances it."""

    def __init__(self) -> None:
        self.now_us = EPOCH_US
        self.slept: list[float] = []

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += round(seconds * 1e6)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)


def limiter(clock: Clock | None = None, **options: Any) -> FleetRateLimiter:
    options = {"rate_per_s": 100.0, "burst": 10.0, **options}
    lim = FleetRateLimiter(fakeredis.FakeAsyncRedis(), **options)
    if clock is not None:
        lim._now_us = clock
        lim._sleep = clock.sleep
    return lim


def quota(clock: Clock, **options: Any) -> DailyQuota:
    options = {"limit": 10, "window_s": 10.0, "buckets": 10, **options}
    q = DailyQuota(fakeredis.FakeAsyncRedis(), **options)
    q._now_us = clock
    return q


async def raw_acquire(lim: FleetRateLimiter, n: int, mode: str) -> tuple[str, float]:
    grant = lim._grant(await lim._call("acquire", lim._acquire_args(n, BULK, None, mode)))
    return grant.status, grant.wait_s


# --- GCRA ------------------------------------------------------------------------------


def test_bulk_burst_then_exact_interval() -> None:
    async def main() -> list[float]:
        lim = limiter(Clock())  # interval 10 ms, bulk burst 8 (20% of 10 reserved)
        return [await lim.reserve(1) for _ in range(11)]

    assert run(main()) == [0.0] * 8 + [0.01, 0.02, 0.03]


def test_weight_counts_recipients() -> None:
    async def main() -> list[float]:
        lim = limiter(Clock())
        return [await lim.reserve(5), await lim.reserve(5), await lim.reserve(3)]

    # 5 fit the 80 ms bulk tolerance; the next 5 end at 100 ms (wait 20); 3 more: 130 ms.
    assert run(main()) == [0.0, 0.02, 0.05]


def test_weight_larger_than_burst_waits_n_over_rate() -> None:
    async def main() -> tuple[float, float, list[float]]:
        clock = Clock()
        lim = limiter(clock)
        waited = await lim.acquire(50)
        return waited, await lim.reserve(1), clock.slept

    waited, after, slept = run(main())
    assert slept == [0.42]  # 50 * 10 ms minus the 80 ms bulk tolerance
    assert waited < 0.42  # measured on the monotonic clock: the fake sleep is instant
    assert after == 0.01


def test_sustained_rate_equals_configured_rate() -> None:
    async def main() -> tuple[int, float]:
        clock = Clock()
        lim = limiter(clock, rate_per_s=40.0, burst=4.0)
        sent = 0
        for i in range(400):
            await lim.acquire(1 + i % 5)
            sent += 1 + i % 5
        return sent, (clock.now_us - EPOCH_US) / 1e6

    sent, elapsed = run(main())
    bulk_burst = 4 * 0.8
    assert sent - bulk_burst == pytest.approx(40.0 * elapsed, abs=0.01)


def test_transactional_finds_headroom_while_bulk_saturates() -> None:
    async def main() -> tuple[list[float], list[float], float]:
        clock = Clock()
        lim = limiter(clock)
        bulk = [await lim.reserve(1) for _ in range(8)]  # bulk burst used: TAT = now + 80 ms
        tx = [await lim.reserve(1, priority=TX) for _ in range(3)]
        return bulk, tx, await lim.reserve(1)

    bulk, tx, bulk_after = run(main())
    assert bulk == [0.0] * 8
    assert tx == [0.0, 0.0, 0.01]  # the reserve is 2 tokens (20% of 10)
    assert bulk_after == pytest.approx(0.04)  # transactional traffic pushed bulk back


def test_bulk_does_not_queue_beyond_its_lookahead() -> None:
    async def main() -> tuple[list[tuple[str, float]], float, float]:
        clock = Clock()
        lim = limiter(clock, bulk_lookahead_s=0.02)
        for _ in range(11):  # TAT = now + 110 ms: beyond 80 ms tolerance + 20 ms lookahead
            await lim.reserve(1)
        tokens = (await lim.status()).tokens_available
        answers = [await raw_acquire(lim, 2, "fresh") for _ in range(3)]
        answers.append(await raw_acquire(lim, 2, "again"))
        tx_wait = await lim.reserve(1, priority=TX)
        return answers, tokens, tx_wait

    answers, tokens, tx_wait = run(main())
    # Nothing reserved; each first-time caller gets its own slot in a line, 20 ms apart;
    # a caller coming back is told when bulk fits again, not sent to the end of the line.
    assert answers == [("later", 0.01), ("later", 0.03), ("later", 0.05), ("later", 0.01)]
    assert tokens == 0.0
    assert tx_wait == pytest.approx(0.02)  # behind 110 ms of reservations, not 170


def test_bulk_line_comes_back_one_by_one() -> None:
    async def main() -> list[tuple[str, float]]:
        clock = Clock()
        lim = limiter(clock, bulk_lookahead_s=0.0)
        for _ in range(9):
            await lim.reserve(1)  # TAT = now + 90 ms > 80 ms tolerance
        first = [await raw_acquire(lim, 1, "fresh") for _ in range(3)]
        clock.advance(first[0][1])
        back = [await raw_acquire(lim, 1, "again")]
        return first + back

    first_a, first_b, first_c, back = run(main())
    assert (first_a[0], first_b[0], first_c[0]) == ("later", "later", "later")
    assert first_a[1] == pytest.approx(0.01)
    assert first_b[1] - first_a[1] == pytest.approx(0.01)
    assert first_c[1] - first_b[1] == pytest.approx(0.01)
    assert back == ("ok", 0.01)  # at its slot it reserves and waits one interval


def test_acquire_returns_after_coming_back() -> None:
    async def main() -> tuple[list[float], int]:
        clock = Clock()
        lim = limiter(clock, bulk_lookahead_s=0.0)
        for _ in range(12):
            await lim.reserve(1)
        before = lim.round_trips
        await lim.acquire(1)
        return clock.slept, lim.round_trips - before

    slept, trips = run(main())
    assert trips == 2
    assert sum(slept) == pytest.approx(0.05)  # 120 ms reserved ahead - 80 ms + 10 ms own


def test_max_wait_reserves_nothing() -> None:
    async def main() -> tuple[float, float, float, float]:
        lim = limiter(Clock())
        started = time.monotonic()
        with pytest.raises(RateLimitWaitExceeded) as info:
            await lim.acquire(50, max_wait_s=0.1)
        elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, SesTasksError)
        status = await lim.status()
        return info.value.wait_s, elapsed, status.bulk_tokens_available, await lim.reserve(8)

    wait_s, elapsed, bulk_tokens, next_wait = run(main())
    # The wait the server computed (0.42 s on the fake clock) plus the real time the call
    # took (the error reports the whole wait from the caller's start; a loaded machine
    # adds milliseconds).
    assert 0.41 <= wait_s <= 0.43 + elapsed
    assert bulk_tokens == pytest.approx(8.0)
    assert next_wait == 0.0


def test_cancelled_wait_gives_the_tokens_back() -> None:
    async def main() -> tuple[float, float, float]:
        clock = Clock()
        lim = limiter(clock)
        blocked = asyncio.Event()
        never = asyncio.Event()

        async def stuck_sleep(seconds: float) -> None:
            blocked.set()
            await never.wait()

        await lim.reserve(8)
        before = (await lim.status()).tokens_available
        lim._sleep = stuck_sleep
        task = asyncio.create_task(lim.acquire(5))
        await asyncio.wait_for(blocked.wait(), 5)
        during = (await lim.status()).tokens_available
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return before, during, (await lim.status()).tokens_available

    before, during, after = run(main())
    assert before == pytest.approx(2.0)
    assert during == 0.0
    assert after == pytest.approx(before)


def test_cancelled_place_in_line_is_given_back() -> None:
    async def main() -> tuple[tuple[str, float], tuple[str, float]]:
        clock = Clock()
        lim = limiter(clock, bulk_lookahead_s=0.0)
        await lim.reserve(12)  # TAT = now + 120 ms: bulk must line up
        blocked = asyncio.Event()

        async def stuck_sleep(seconds: float) -> None:
            blocked.set()
            await asyncio.Event().wait()

        lim._sleep = stuck_sleep
        first = await raw_acquire(lim, 3, "fresh")
        await lim._call("refund", ["qtat", str(EPOCH_US + 150_000), str(EPOCH_US + 120_000)])
        task = asyncio.create_task(lim.acquire(3))
        await asyncio.wait_for(blocked.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return first, await raw_acquire(lim, 3, "fresh")

    first, after_cancel = run(main())
    assert first == ("later", 0.04)
    assert after_cancel == first  # the cancelled caller's place went back to the line


def test_real_time_acquire_waits_the_time_needed() -> None:
    async def main() -> tuple[float, float]:
        lim = limiter(rate_per_s=200.0, burst=1.0, transactional_reserve=0.0)
        return await lim.acquire(1), await lim.acquire(10)

    first, second = run(main())
    assert first < 0.03
    assert 0.045 <= second < 0.25  # 10 recipients at 200/s


# --- adaptive rate ---------------------------------------------------------------------


def test_throttle_halves_once_per_guard_interval(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[float]:
        clock = Clock()
        lim = limiter(clock)
        rates = [await lim.on_throttle(), await lim.on_throttle()]
        clock.advance(0.5)
        rates.append(await lim.on_throttle())
        clock.advance(1.0)  # 1.5 s after the first: one recovery step (+5/s), then halve
        rates.append(await lim.on_throttle())
        for _ in range(5):
            clock.advance(1.0)
            rates.append(await lim.on_throttle())
        return rates

    with caplog.at_level(logging.INFO, logger="ses_tasks.limits.ratelimit"):
        rates = run(main())
    assert rates[:3] == [50.0, 50.0, 50.0]
    assert rates[3] == pytest.approx(27.5)
    assert rates[-1] == pytest.approx(10.0)  # floor: 10% of the configured rate
    assert "100.000/s -> 50.000/s (throttle" in caplog.text
    assert "50.000/s -> 55.000/s (recover" in caplog.text


def test_rate_recovers_additively_from_server_time(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[Any]:
        clock = Clock()
        lim = limiter(clock, recover_per_s=10.0)
        await lim.on_throttle()
        seen = [await lim.status()]
        clock.advance(0.9)
        seen.append(await lim.status())
        clock.advance(2.2)  # 3.1 s after the throttle: three steps
        seen.append(await lim.status())
        clock.advance(60)
        seen.append(await lim.status())
        return seen

    with caplog.at_level(logging.INFO, logger="ses_tasks.limits.ratelimit"):
        throttled, early, later, full = run(main())
    assert throttled.effective_rate_per_s == 50.0
    assert throttled.last_change_reason == "throttle"
    assert throttled.previous_rate_per_s == 100.0
    assert throttled.last_change_at == EPOCH_US / 1e6
    assert early.effective_rate_per_s == 50.0
    assert later.effective_rate_per_s == pytest.approx(80.0)
    assert later.last_change_reason == "recover"
    assert full.effective_rate_per_s == 100.0
    assert full.configured_rate_per_s == 100.0
    assert "80.000/s -> 100.000/s (recover" in caplog.text


def test_lower_rate_spaces_reservations_further() -> None:
    async def main() -> list[float]:
        lim = limiter(Clock(), burst=1.0, transactional_reserve=0.0)
        await lim.on_throttle()  # 50/s: 20 ms per recipient, burst 0.5 recipient
        return [await lim.reserve(1) for _ in range(3)]

    assert run(main()) == [0.01, 0.03, 0.05]


def test_fleet_shares_one_state() -> None:
    async def main() -> tuple[float, float]:
        server = fakeredis.FakeServer()
        a = FleetRateLimiter(fakeredis.FakeAsyncRedis(server=server), rate_per_s=100.0)
        b = FleetRateLimiter(fakeredis.FakeAsyncRedis(server=server), rate_per_s=100.0)
        await a.on_throttle()
        await a.reserve(50)
        status = await b.status()
        return status.effective_rate_per_s, status.bulk_tokens_available

    rate, tokens = run(main())
    assert rate == 50.0
    assert tokens < 1.0


# --- plumbing --------------------------------------------------------------------------


def test_scripts_reload_after_script_flush() -> None:
    async def main() -> float:
        r = fakeredis.FakeAsyncRedis()
        lim = FleetRateLimiter(r, rate_per_s=100.0)
        await lim.reserve(1)
        await r.script_flush()
        return await lim.reserve(1)

    assert run(main()) == 0.0


def test_keys_of_one_account_share_a_cluster_slot() -> None:
    from redis.crc import key_slot

    r = fakeredis.FakeAsyncRedis()
    lim = FleetRateLimiter(r, key_prefix="p", account="eu-west-1", rate_per_s=1.0)
    q = DailyQuota(r, key_prefix="p", account="eu-west-1", limit=None)
    assert lim.key == "p:rate:{eu-west-1}"
    assert key_slot(lim.key.encode()) == key_slot(q.key.encode())


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"rate_per_s": 0.0}, "rate_per_s"),
        ({"rate_per_s": math.inf}, "rate_per_s"),
        ({"burst": -1.0}, "burst"),
        ({"transactional_reserve": 1.0}, "transactional_reserve"),
        ({"decrease_factor": 1.5}, "decrease_factor"),
        ({"min_rate_per_s": 500.0}, "min_rate_per_s"),
        ({"account": "a{b}"}, "account"),
    ],
)
def test_options_are_validated(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        limiter(**options)
    assert info.value.setting == setting


def test_client_kind_and_weight_are_checked() -> None:
    with pytest.raises(ConfigurationError) as info:
        FleetRateLimiter(fakeredis.FakeRedis(), rate_per_s=1.0)  # type: ignore[arg-type]
    assert info.value.setting == "redis"
    with pytest.raises(ConfigurationError) as info:
        DailyQuota(fakeredis.FakeRedis(), limit=1)  # type: ignore[arg-type]
    assert info.value.setting == "redis"
    with pytest.raises(ValidationError):
        run(limiter().acquire(0))
    with pytest.raises(ValidationError):
        run(quota(Clock()).try_consume(0))


def test_redis_errors_are_translated() -> None:
    server = fakeredis.FakeServer()
    server.connected = False  # every command fails with redis.ConnectionError
    dead = fakeredis.FakeAsyncRedis(server=server)
    lim = FleetRateLimiter(dead, rate_per_s=1.0)
    with pytest.raises(LimiterUnavailableError) as info:
        run(lim.acquire())
    assert isinstance(info.value, ConnectionError)
    q = DailyQuota(dead, limit=1)
    with pytest.raises(QuotaUnavailableError):
        run(q.try_consume(1))


def test_acquire_weight_priority_throttle_status_and_repr() -> None:
    async def main() -> tuple[list[float], list[float], float, float]:
        clock = Clock()
        lim = limiter(clock)
        waits = [await lim.reserve(1) for _ in range(9)]
        await lim.acquire(3, priority=TX)
        return (
            waits,
            clock.slept,
            await lim.on_throttle(),
            (await lim.status()).effective_rate_per_s,
        )

    waits, slept, throttled, effective = run(main())
    assert waits == [0.0] * 8 + [0.01]
    assert slept == [pytest.approx(0.02)]  # 90 ms ahead + 30 ms own - 100 ms tolerance
    assert throttled == 50.0
    assert effective == 50.0
    assert "rate=100/s" in repr(limiter())


# --- rolling quota ---------------------------------------------------------------------


def test_quota_counts_and_refuses_with_time_until_capacity_frees() -> None:
    async def main() -> list[Any]:
        clock = Clock()
        q = quota(clock)  # limit 10 per 10 s, 1 s buckets
        clock.advance(0.5)
        out: list[Any] = [await q.try_consume(4)]
        clock.advance(2.7)  # 3.2 s
        out.append(await q.try_consume(4))
        clock.advance(1.8)  # 5.0 s: 8 used; 5 more need 3 freed: bucket 0 leaves at 11 s
        out.append(await q.try_consume(5))
        out.append(await q.try_consume(2))
        clock.advance(5.9)  # 10.9 s: bucket 0 still counts
        out.append(await q.try_consume(1))
        clock.advance(0.1)  # 11.0 s
        out.append(await q.try_consume(4))
        out.append(await q.status())
        return out

    first, second, refused, fits, still, after, status = run(main())
    assert (first.granted, first.used, first.limit) == (True, 4, 10)
    assert (second.granted, second.used) == (True, 8)
    assert (refused.granted, refused.used) == (False, 8)
    assert refused.retry_after_s == pytest.approx(6.0)
    assert (fits.granted, fits.used) == (True, 10)
    assert not still.granted
    assert still.retry_after_s == pytest.approx(0.1)
    assert (after.granted, after.used) == (True, 10)  # 4 left with bucket 0, 4 came in
    assert (status.used, status.limit, status.window_s, status.remaining) == (10, 10, 10.0, 0)


def test_quota_window_rolls_over_and_cleans_up() -> None:
    async def main() -> tuple[int, int, int]:
        clock = Clock()
        q = quota(clock, limit=None)
        for _ in range(30):  # three windows of sends, one per bucket
            assert (await q.try_consume(7)).granted
            clock.advance(1.0)
        used = (await q.status()).used
        fields = await q._redis.hlen(q.key)
        clock.advance(11.0)
        return used, fields, (await q.status()).used

    used, fields, later = run(main())
    assert used == 7 * 10  # the 10 buckets before the current (empty) one
    assert fields <= 11 + 3  # buckets plus total/lo/hi: bounded, not one per recipient
    assert later == 0


def test_quota_refuses_more_than_the_limit_forever() -> None:
    decision = run(quota(Clock()).try_consume(11))
    assert not decision.granted
    assert decision.retry_after_s == math.inf


def test_quota_exhausted_stops_the_account_until_the_mark_passes() -> None:
    async def main() -> list[Any]:
        clock = Clock()
        q = quota(clock, limit=None)
        await q.try_consume(3)
        out: list[Any] = [await q.mark_exhausted(30.0, reason="454 Daily message quota exceeded")]
        out.append(await q.mark_exhausted(5.0))  # an earlier, longer mark is kept
        clock.advance(10.0)
        out.append(await q.try_consume(1))
        out.append(await q.status())
        clock.advance(20.0)
        out.append(await q.try_consume(1))
        out.append(await q.status())
        return out

    first, second, refused, status, granted, cleared = run(main())
    assert first == 30.0
    assert second == 30.0
    assert not refused.granted
    assert refused.retry_after_s == pytest.approx(20.0)
    assert status.exhausted_until == pytest.approx(EPOCH_US / 1e6 + 30.0)
    assert status.reason == "454 Daily message quota exceeded"
    assert granted.granted
    assert (cleared.exhausted_until, cleared.reason) == (None, None)


def test_quota_exhausted_estimate_uses_the_oldest_bucket() -> None:
    async def main() -> tuple[float, float]:
        clock = Clock()
        q = quota(clock, limit=None)
        empty = await q.mark_exhausted()
        clock.advance(2.5)
        await q.try_consume(3)  # bucket 2, leaves the window at 13 s
        clock.advance(2.0)
        return empty, await q.mark_exhausted()

    empty, estimate = run(main())
    assert empty == 1.0  # nothing counted: check again after one bucket
    assert estimate == pytest.approx(13.0 - 4.5)


def test_quota_release_uncounts() -> None:
    async def main() -> tuple[int, int, int]:
        q = quota(Clock())
        await q.try_consume(6)
        released = await q.release(4)
        over = await q.release(10)
        return released, over, (await q.status()).used

    assert run(main()) == (4, 2, 0)


def test_quota_after_script_flush() -> None:
    async def main() -> list[Any]:
        r = fakeredis.FakeAsyncRedis()
        q = DailyQuota(r, limit=5, window_s=10.0, buckets=10)
        q._now_us = Clock()
        out: list[Any] = [(await q.try_consume(5)).granted]
        await r.script_flush()
        out.append((await q.try_consume(1)).granted)
        out.append(await q.mark_exhausted(2.0))
        out.append((await q.status()).reason)
        out.append(await q.release(5))
        return out

    assert run(main()) == [True, False, 2.0, "Daily message quota exceeded", 5]
    assert "limit=5" in repr(DailyQuota(fakeredis.FakeAsyncRedis(), limit=5))


def test_quota_options_are_validated() -> None:
    r = fakeredis.FakeAsyncRedis()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limit": -1}, "limit"),
        ({"limit": None, "window_s": 0.0}, "window_s"),
        ({"limit": None, "buckets": 0}, "buckets"),
    ]
    for options, setting in cases:
        with pytest.raises(ConfigurationError) as info:
            DailyQuota(r, **options)
        assert info.value.setting == setting


# --- scrape-time gauges (ses_tasks.ops.metrics.FleetCollector) -------------------------------


class CountedClients:
    """Stands in for ``connections.async_redis``: fake clients on one server, closes counted."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.server = server
        self.options: list[dict[str, Any]] = []
        self.closed = 0

    def __call__(self, url: str, *, settings: Any = None, **overrides: Any) -> Any:
        self.options.append(overrides)
        client = fakeredis.FakeAsyncRedis(server=self.server)
        aclose = client.aclose

        async def counted_aclose(*args: Any, **kwargs: Any) -> None:
            self.closed += 1
            await aclose(*args, **kwargs)

        client.aclose = counted_aclose  # type: ignore[method-assign]
        return client


def test_fleet_collector_reads_the_async_status_with_one_client_per_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("prometheus_client")
    from ses_tasks import connections, metrics
    from ses_tasks.config import Settings

    server = fakeredis.FakeServer()
    clients = CountedClients(server)
    monkeypatch.setattr(connections, "async_redis", clients)

    async def seed() -> None:
        r = fakeredis.FakeAsyncRedis(server=server)
        await FleetRateLimiter(r, key_prefix="m", rate_per_s=100.0).on_throttle()
        await DailyQuota(r, key_prefix="m", limit=1000).try_consume(7)

    run(seed())
    collector = metrics.FleetCollector(
        Settings(key_prefix="m", max_send_rate=100.0, max_24h_send=1000)
    )

    def gauges() -> dict[str, float]:
        return {family.name: family.samples[0].value for family in collector.collect()}

    expected = {
        "ses_tasks_effective_rate_per_second": 50.0,
        "ses_tasks_configured_rate_per_second": 100.0,
        "ses_tasks_quota_used": 7,
        "ses_tasks_quota_limit": 1000,
    }
    assert gauges() == expected
    assert gauges() == expected
    assert (len(clients.options), clients.closed) == (2, 2)  # each scrape closes its client
    timeout = metrics.REDIS_SCRAPE_TIMEOUT_S
    assert clients.options[0] == {"socket_timeout": timeout, "socket_connect_timeout": timeout}

    async def from_a_running_loop() -> dict[str, float]:
        return gauges()

    assert run(from_a_running_loop()) == expected
    assert (len(clients.options), clients.closed) == (3, 3)

    server.connected = False  # Redis down: no fleet gauges, no error, client still closed
    assert gauges() == {}
    assert (len(clients.options), clients.closed) == (4, 4)
