"""The timeline's pure helpers, argument checks and reader, on fakeredis."""

from __future__ import annotations

import asyncio
import math

import fakeredis
import pytest

from ses_tasks.keys import Keys
from ses_tasks.states import MessageState
from ses_tasks.store.timeline import (
    BUCKET_S,
    KEEP_HOURS,
    TimelinePoint,
    bucket_start,
    rate_now,
    read_timeline,
)
from ses_tasks.store.tracking import Settlement, StatusStore, Transition, _Base

HOUR = 1_767_225_600  # an hour boundary
KEYS = Keys("t")


def test_bucket_start_floors_to_the_bucket() -> None:
    assert bucket_start(HOUR) == HOUR
    assert bucket_start(HOUR + 4.999) == HOUR
    assert bucket_start(HOUR + 5) == HOUR + 5
    assert bucket_start(HOUR - 0.001) == HOUR - BUCKET_S
    assert 3600 % BUCKET_S == 0  # a bucket never straddles two hour hashes


def test_the_timeline_key_shares_the_campaign_hash_tag() -> None:
    assert KEYS.timeline("c1", 490896) == "t:c:{c1}:tl:490896"
    assert KEYS.timeline("c1", 1).startswith(KEYS.campaign("c1") + ":")


def test_finish_passes_the_current_hour_key_and_bucket() -> None:
    base = _Base(key_prefix="t")
    base.clock = lambda: HOUR + 3599.9
    keys, argv = base._finish_args(
        "c1", [Transition("c1.0", MessageState.SENT)], False, Settlement()
    )
    assert keys[-1] == KEYS.timeline("c1", HOUR // 3600)
    assert keys[-2] == KEYS.backlog("c1")  # the script's backlog index is unchanged
    assert argv[8:10] == [HOUR + 3595, KEEP_HOURS * 3600]


@pytest.mark.parametrize(
    ("since_s", "match"),
    [(-1, "since_s must be between"), (KEEP_HOURS * 3600 + 1, "since_s"), (math.nan, "since_s")],
)
def test_read_timeline_refuses_a_bad_window(since_s: float, match: str) -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(ValueError, match=match):
        asyncio.run(read_timeline(client, KEYS, "c1", since_s=since_s, now=HOUR))


def test_rate_now_refuses_a_window_shorter_than_a_bucket_and_bad_campaign_ids() -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(ValueError, match="window_s"):
        asyncio.run(rate_now(client, KEYS, "c1", window_s=BUCKET_S - 1, now=HOUR))
    with pytest.raises(ValueError, match="campaign_id"):
        asyncio.run(read_timeline(client, KEYS, "bad id!", since_s=10, now=HOUR))


@pytest.mark.parametrize("decode", [False, True])
def test_read_timeline_fills_gaps_with_zeros_across_an_hour(decode: bool) -> None:
    client = fakeredis.FakeAsyncRedis(decode_responses=decode)

    async def main() -> list[TimelinePoint]:
        await client.hset(KEYS.timeline("c1", HOUR // 3600 - 1), f"{HOUR - 5}:s", 4)
        await client.hset(KEYS.timeline("c1", HOUR // 3600), mapping={f"{HOUR}:f": 2})
        await client.hset(KEYS.timeline("c2", HOUR // 3600), f"{HOUR + 5}:s", 9)  # another
        return await read_timeline(client, KEYS, "c1", since_s=12, now=HOUR + 6)

    assert asyncio.run(main()) == [
        TimelinePoint(HOUR - 10, 0, 0),
        TimelinePoint(HOUR - 5, 4, 0),
        TimelinePoint(HOUR, 0, 2),
        TimelinePoint(HOUR + 5, 0, 0),
    ]


def test_a_whole_hour_in_the_window_is_read_in_full() -> None:
    client = fakeredis.FakeAsyncRedis()

    async def main() -> list[TimelinePoint]:
        key = KEYS.timeline("c1", HOUR // 3600 - 1)
        await client.hset(key, mapping={f"{HOUR - 3600}:s": 1, f"{HOUR - 5}:f": 3})
        return await read_timeline(client, KEYS, "c1", since_s=3600, now=HOUR + 0.5)

    points = asyncio.run(main())
    assert len(points) == 3600 // BUCKET_S + 1
    assert points[0] == TimelinePoint(HOUR - 3600, 1, 0)
    assert points[-2] == TimelinePoint(HOUR - 5, 0, 3)
    assert sum(p.sent + p.failed for p in points) == 4


def test_the_sync_store_records_sends_and_failures_once() -> None:
    server = fakeredis.FakeServer()
    store = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    store.create_campaign("c1")
    store.add_queued("c1", 3)
    store.clock = lambda: HOUR + 7
    done = [
        Transition("c1.0", MessageState.SENT, 250, "", "ses-0"),
        Transition("c1.1", MessageState.FAILED, 554, "no"),
        Transition("c1.2", MessageState.RETRYING, 421, "later"),
    ]
    store.finish("c1", done)
    store.finish("c1", done[:2])  # replayed: already sent, already failed
    points = asyncio.run(
        read_timeline(
            fakeredis.FakeAsyncRedis(server=server), store.keys, "c1", since_s=5, now=HOUR + 7
        )
    )
    assert points == [TimelinePoint(HOUR, 0, 0), TimelinePoint(HOUR + 5, 1, 1)]
    assert store.campaign_status("c1").counts["sent"] == 1
