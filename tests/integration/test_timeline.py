"""The campaign timeline on real Redis: what ``finish`` records and what the dashboard reads.

Outcomes go through the real stores (sync and async, the same ``tracking_finish.lua``);
each store's ``clock`` is pinned so a batch lands in a chosen bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from ses_tasks.keys import Keys
from ses_tasks.states import MessageState
from ses_tasks.store.timeline import (
    BUCKET_S,
    KEEP_HOURS,
    TimelinePoint,
    bucket_start,
    rate_now,
    rates_now,
    read_timeline,
)
from ses_tasks.store.tracking import AsyncStatusStore, Settlement, StatusStore, Transition

from ..conftest import REDIS_URL

T = TypeVar("T")
#: An hour boundary (Unix s): 2026-01-01T00:00:00Z.
HOUR = 1_767_225_600
CID = "tl1"


def run(fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run ``fn`` with an asyncio client of its own loop."""

    async def main() -> T:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.fixture
def store(redis_client: redis.Redis, key_prefix: str) -> Iterator[StatusStore]:
    yield StatusStore(redis_client, key_prefix=key_prefix, retention_s=3600)


def start(store: StatusStore, n: int, cid: str = CID) -> list[str]:
    """A running campaign of ``n`` messages, all claimed by worker ``w``."""
    store.create_campaign(cid)
    store.add_queued(cid, n)
    store.finish_enqueue(cid)
    items = [(f"{cid}.{i}", f"u{i}@example.com", False) for i in range(n)]
    store.claim(cid, items, lease_s=60, token="w")
    return [mid for mid, _, _ in items]


def at(store: Any, t: float) -> Any:
    store.clock = lambda: t
    return store


def sent(mid: str) -> Transition:
    return Transition(mid, MessageState.SENT, 250, "", f"ses-{mid}")


def failed(mid: str) -> Transition:
    return Transition(mid, MessageState.FAILED, 554, "rejected")


def timeline(store: StatusStore, *, since_s: float, now: float, cid: str = CID) -> list[Any]:
    return run(lambda r: read_timeline(r, store.keys, cid, since_s=since_s, now=now))


def test_a_batch_finished_by_the_worker_lands_in_its_bucket(
    store: StatusStore, key_prefix: str
) -> None:
    mids = start(store, 5)
    t = HOUR + 1802.7  # inside the bucket starting at HOUR + 1800

    async def finish(client: aioredis.Redis) -> None:
        astore = at(AsyncStatusStore(client, key_prefix=key_prefix), t)
        outcomes = [sent(mids[0]), sent(mids[1]), sent(mids[2]), failed(mids[3])]
        outcomes.append(Transition(mids[4], MessageState.RETRYING, 421, "later"))
        await astore.finish(CID, outcomes, settle=Settlement(token="w"))

    run(finish)
    key = store.keys.timeline(CID, HOUR // 3600)
    assert store.redis.hgetall(key) == {
        f"{HOUR + 1800}:s".encode(): b"3",
        f"{HOUR + 1800}:f".encode(): b"1",
    }
    points = timeline(store, since_s=10, now=t + 5)
    assert points == [
        TimelinePoint(HOUR + 1795, 0, 0),
        TimelinePoint(HOUR + 1800, 3, 1),
        TimelinePoint(HOUR + 1805, 0, 0),
    ]


def test_the_hash_expires_after_keep_hours(store: StatusStore) -> None:
    mids = start(store, 1)
    at(store, HOUR + 10).finish(CID, [sent(mids[0])])
    ttl = store.redis.ttl(store.keys.timeline(CID, HOUR // 3600))
    assert KEEP_HOURS * 3600 - 5 <= ttl <= KEEP_HOURS * 3600


def test_no_op_transitions_are_not_counted(store: StatusStore) -> None:
    mids = start(store, 3)
    at(store, HOUR)
    store.finish(CID, [sent(mids[0]), failed(mids[1])])
    # Replays of the same outcomes, a sent message reported failed, a retry: no new events.
    store.finish(CID, [sent(mids[0]), failed(mids[1]), failed(mids[0])])
    store.finish(CID, [Transition(mids[2], MessageState.RETRYING, 421, "later")])
    # retry-failed reopens the failure: a move, but not a send or a failure.
    store.finish(CID, [Transition(mids[1], MessageState.QUEUED)], requeue=True)
    assert timeline(store, since_s=0, now=HOUR) == [TimelinePoint(HOUR, 1, 1)]
    assert store.campaign_status(CID).counts["sent"] == 1


def test_nothing_recorded_leaves_no_hash(store: StatusStore) -> None:
    mids = start(store, 1)
    at(store, HOUR).finish(CID, [Transition(mids[0], MessageState.DEFERRED, 0, "paused")])
    assert not store.redis.exists(store.keys.timeline(CID, HOUR // 3600))
    assert timeline(store, since_s=10, now=HOUR) == [
        TimelinePoint(HOUR - 10, 0, 0),
        TimelinePoint(HOUR - 5, 0, 0),
        TimelinePoint(HOUR, 0, 0),
    ]


def test_a_message_another_worker_took_over_is_not_counted_as_our_failure(
    store: StatusStore,
) -> None:
    mids = start(store, 1)
    at(store, HOUR)
    # Our lease lapsed and worker w2 holds the message: our failure is dropped...
    store.redis.hset(store.keys.message(mids[0]), "lease_token", "w2")
    store.finish(CID, [failed(mids[0])], settle=Settlement(token="w"))
    assert timeline(store, since_s=0, now=HOUR) == [TimelinePoint(HOUR, 0, 0)]
    # ...but a send is a send, whoever holds the lease.
    store.finish(CID, [sent(mids[0])], settle=Settlement(token="w"))
    assert timeline(store, since_s=0, now=HOUR) == [TimelinePoint(HOUR, 1, 0)]


def test_a_window_across_an_hour_boundary_reads_both_hashes(store: StatusStore) -> None:
    mids = start(store, 6)
    at(store, HOUR - 3).finish(CID, [sent(mids[0]), sent(mids[1])])  # bucket HOUR - 5
    at(store, HOUR + 0.5).finish(CID, [sent(mids[2]), failed(mids[3])])  # bucket HOUR
    at(store, HOUR + 12).finish(CID, [sent(mids[4])])  # bucket HOUR + 10
    hours = [store.keys.timeline(CID, HOUR // 3600 - 1), store.keys.timeline(CID, HOUR // 3600)]
    assert store.redis.exists(*hours) == 2
    points = timeline(store, since_s=20, now=HOUR + 12)
    assert [p.t for p in points] == [HOUR - 10 + BUCKET_S * i for i in range(5)]
    assert [(p.sent, p.failed) for p in points] == [(0, 0), (2, 0), (1, 1), (0, 0), (1, 0)]
    # The timeline's sends are the campaign's sends.
    assert sum(p.sent for p in points) == store.campaign_status(CID).counts["sent"] == 4


def test_a_long_window_reads_whole_hours_too(store: StatusStore) -> None:
    mids = start(store, 3)
    at(store, HOUR - 3600).finish(CID, [sent(mids[0])])  # first bucket of the previous hour
    at(store, HOUR - 1).finish(CID, [failed(mids[1])])  # last bucket of it
    at(store, HOUR + 7).finish(CID, [sent(mids[2])])
    points = timeline(store, since_s=3600 + 10, now=HOUR + 7)
    assert len(points) == (3600 + 10) // BUCKET_S + 1
    assert points[0] == TimelinePoint(HOUR - 3605, 0, 0)
    assert points[1] == TimelinePoint(HOUR - 3600, 1, 0)
    assert points[-3] == TimelinePoint(HOUR - 5, 0, 1)
    assert points[-1] == TimelinePoint(HOUR + 5, 1, 0)
    assert sum(p.sent for p in points) == 2 and sum(p.failed for p in points) == 1


def test_rate_now_counts_only_complete_buckets(store: StatusStore) -> None:
    mids = start(store, 40)
    # 30 sends spread over the six complete buckets before HOUR + 30, five per bucket.
    for i in range(6):
        batch = mids[i * 5 : i * 5 + 5]
        at(store, HOUR + i * BUCKET_S + 1).finish(CID, [sent(m) for m in batch])
    at(store, HOUR - 1).finish(CID, [sent(m) for m in mids[30:35]])  # before the window
    at(store, HOUR + 31).finish(CID, [sent(m) for m in mids[35:40]])  # still filling

    def rate(now: float, window_s: float = 30) -> float:
        return run(lambda r: rate_now(r, store.keys, CID, window_s=window_s, now=now))

    assert rate(HOUR + 32) == pytest.approx(1.0)
    assert rate(HOUR + 32, window_s=10) == pytest.approx(1.0)
    assert rate(HOUR + 32, window_s=60) == pytest.approx(35 / 60)
    assert rate(HOUR + 3600) == 0.0


def test_a_campaign_sent_by_real_workers_adds_up(make_pipeline: Any) -> None:
    """Worker processes record through the async store; the chart agrees with the counters."""
    bad = ["bad1@example.com", "bad2@example.com"]
    pipeline = make_pipeline(
        "tls", sandbox_args=[a for b in bad for a in ("--reject-recipient", b)]
    )
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    began = time.time()
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=[*(f"ok{i}@example.com" for i in range(60)), *bad],
        campaign_id="tl-e2e",
    )
    final = pipeline.wait_done("tl-e2e")
    assert final.counts["sent"] == 60 and final.counts["failed"] == 2
    keys = client.store.keys

    def points() -> list[TimelinePoint]:
        now = time.time()
        return run(lambda r: read_timeline(r, keys, "tl-e2e", since_s=now - began + 1, now=now))

    first = points()
    assert sum(p.sent for p in first) == 60 and sum(p.failed for p in first) == 2
    # retry-failed reopens both; failing again is two more failure events, no more sends.
    assert client.retry_failed("tl-e2e") == 2
    again = pipeline.wait_done("tl-e2e")
    assert again.counts["failed"] == 2
    second = points()
    assert sum(p.sent for p in second) == 60 and sum(p.failed for p in second) == 4


def test_rates_now_reads_many_campaigns_at_once(key_prefix: str) -> None:
    keys = Keys(key_prefix)
    now = float(HOUR) + 1  # the window reaches back into the previous hour's hash

    async def go(redis: aioredis.Redis) -> tuple[dict[str, float], list[float]]:
        for n, cid in enumerate(("a", "b", "c")):
            for back in range(1, 7):  # the six complete buckets before now's
                t = bucket_start(now) - back * BUCKET_S
                await redis.hincrby(keys.timeline(cid, t // 3600), f"{t}:s", 10 * (n + 1))
        rates = await rates_now(redis, keys, ["a", "b", "c", "none"], window_s=30, now=now)
        one_by_one = [await rate_now(redis, keys, c, window_s=30, now=now) for c in rates]
        assert await rates_now(redis, keys, [], now=now) == {}
        return rates, one_by_one

    rates, one_by_one = run(go)
    assert rates == {"a": 2.0, "b": 4.0, "c": 6.0, "none": 0.0}
    assert one_by_one == list(rates.values())
