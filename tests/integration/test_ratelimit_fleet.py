"""The fleet limiter against real Redis, from several OS processes at once.

Each process runs an asyncio loop with several concurrent acquirers (weights 1..5), the way
worker processes do. Grant times are ``time.time()`` when an acquirer finished waiting; all
processes run on this machine, so they share that clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from ses_tasks.limits.quota import DailyQuota
from ses_tasks.limits.ratelimit import FleetRateLimiter, Priority

REDIS_URL = os.environ.get("SES_TASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RATE_PER_S = 200.0
BURST = 20.0
RESERVE = 0.2
PROCESSES = 4
ACQUIRERS_PER_PROCESS = 4
RUN_S = 6.0
START_TIMEOUT_S = 60.0


@pytest.fixture
def prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    value = f"test:{uuid.uuid4().hex}"
    yield value
    keys = list(client.scan_iter(match=f"{value}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def bulk_process(
    prefix: str, seed: int, run_s: float, barrier: Any, stop: Any, results: Any
) -> None:
    """One worker-like process: ACQUIRERS_PER_PROCESS bulk acquirers on one event loop."""
    results.put(asyncio.run(_bulk_loop(prefix, seed, run_s, barrier, stop)))


async def _bulk_loop(
    prefix: str, seed: int, run_s: float, barrier: Any, stop: Any
) -> dict[str, Any]:
    client = aioredis.Redis.from_url(REDIS_URL)
    limiter = FleetRateLimiter(
        client, key_prefix=prefix, rate_per_s=RATE_PER_S, burst=BURST, transactional_reserve=RESERVE
    )
    await client.ping()
    barrier.wait(START_TIMEOUT_S)
    deadline = time.time() + run_s
    calls: list[float] = []
    grants: list[tuple[float, int]] = []

    async def acquirer(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        while time.time() < deadline and not stop.is_set():
            n = rng.randint(1, 5)
            calls.append(time.time())
            await limiter.acquire(n, priority=Priority.BULK)
            grants.append((time.time(), n))

    await asyncio.gather(*(acquirer(i) for i in range(ACQUIRERS_PER_PROCESS)))
    await client.aclose()
    return {"first_call": min(calls), "grants": grants, "round_trips": limiter.round_trips}


def run_fleet(prefix: str, run_s: float, stop: Any, during: Any = None) -> list[dict[str, Any]]:
    """Start the processes, release them together, run ``during()`` then stop them; collect."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=bulk_process, args=(prefix, seed, run_s, barrier, stop, results))
        for seed in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(START_TIMEOUT_S)
        if during is not None:
            try:
                during()
            finally:
                stop.set()
        out = [results.get(timeout=run_s + START_TIMEOUT_S) for _ in procs]
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    return out


def test_fleet_holds_the_configured_rate(prefix: str) -> None:
    ctx = mp.get_context("spawn")
    out = run_fleet(prefix, RUN_S, ctx.Event())
    start = min(r["first_call"] for r in out)
    grants = sorted(g for r in out for g in r["grants"])
    times = [t for t, _ in grants]
    total = sum(n for _, n in grants)
    elapsed = times[-1] - start
    bulk_burst = BURST * (1 - RESERVE)

    sustained = (total - bulk_burst) / elapsed
    assert elapsed > RUN_S - 0.5
    assert 0.97 * RATE_PER_S <= sustained <= RATE_PER_S, (sustained, total, elapsed)

    # No one-second window (starting at any grant) holds more than rate + burst.
    worst, j, in_window = 0, 0, 0
    for t, n in grants:
        in_window += n
        while grants[j][0] < t - 1.0:
            in_window -= grants[j][1]
            j += 1
        worst = max(worst, in_window)
    assert worst <= RATE_PER_S + BURST, worst
    assert all(len(r["grants"]) > 10 for r in out)  # every process got its share


def test_transactional_passes_a_saturating_campaign(prefix: str) -> None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    waits: list[float] = []
    saturated: list[float] = []

    async def transactional() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        limiter = FleetRateLimiter(
            client,
            key_prefix=prefix,
            rate_per_s=RATE_PER_S,
            burst=BURST,
            transactional_reserve=RESERVE,
        )
        deadline = time.monotonic() + 10
        while (await limiter.status()).bulk_tokens_available > 0:  # wait for saturation
            assert time.monotonic() < deadline, "bulk never saturated the limiter"
            await asyncio.sleep(0.01)
        for _ in range(10):
            saturated.append((await limiter.status()).bulk_tokens_available)
            started = time.monotonic()
            await limiter.acquire(1, priority=Priority.TRANSACTIONAL)
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.1)  # one password reset now and then
        await client.aclose()

    out = run_fleet(prefix, 20.0, stop, during=lambda: asyncio.run(transactional()))
    assert len(waits) == 10
    assert max(saturated) < 1.0  # bulk had used its burst whenever we asked
    assert max(waits) < 0.1, waits
    assert sum(n for r in out for _, n in r["grants"]) > RATE_PER_S  # bulk kept sending


def test_scripts_survive_script_flush(prefix: str) -> None:
    async def main() -> tuple[float, float, bool, bool]:
        client = aioredis.Redis.from_url(REDIS_URL)
        limiter = FleetRateLimiter(client, key_prefix=prefix, rate_per_s=RATE_PER_S, burst=BURST)
        quota = DailyQuota(client, key_prefix=prefix, limit=100, window_s=5.0)
        await limiter.acquire(2)
        assert (await quota.try_consume(2)).granted
        await client.script_flush()
        acquire_sha = limiter._lua["acquire"].sha
        gone = not (await client.script_exists(acquire_sha))[0]
        waited = await limiter.acquire(2)
        decision = await quota.try_consume(3)
        back = (await client.script_exists(acquire_sha))[0]
        await client.aclose()
        return waited, decision.used, gone, back

    waited, used, gone, back = asyncio.run(main())
    assert gone and back
    assert waited < 0.1
    assert used == 5
