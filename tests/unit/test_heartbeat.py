"""A worker's heartbeat names its queues and pools for people, and a clean stop removes it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import fakeredis

from ses_tasks.config import Settings
from ses_tasks.store.tracking import AsyncStatusStore
from ses_tasks.worker import heartbeat
from ses_tasks.worker.dispatcher import Dispatcher
from ses_tasks.worker.lanes import Lane


class FakeRuntime:
    """What the dispatcher's heartbeat reads of a worker process."""

    def __init__(self, **settings: Any) -> None:
        self.settings = Settings(host="localhost", port=465, key_prefix="t", **settings)
        self.redis = fakeredis.FakeAsyncRedis()
        self.store = AsyncStatusStore(self.redis, key_prefix="t")
        self.token = "proc-1"
        self.bulk_capacity = 2
        self.consumed_queues: tuple[str, ...] = ("ses.bulk.tls", "ses.tx.tls")
        self.stopping = False
        self.lanes = {
            name: Lane(name, self.settings.for_profile(name), self.redis, None)
            for name in ["", *self.settings.profiles]
        }


def test_a_beat_writes_queues_pools_and_when() -> None:
    rt = FakeRuntime(pool_size=7, profiles={"eu": {"pool_size": 3}})

    class Worker:  # Celery's WorkController, as worker_init sends it
        hostname = "w1@box"

    heartbeat.remember_node(Worker())

    async def main() -> tuple[Any, Any, Any]:
        before = time.time()
        await Dispatcher(rt, lambda job: None)._heartbeat()  # type: ignore[arg-type]
        keys = rt.store.keys
        seen = await rt.redis.zscore(keys.workers_seen(), rt.token)
        raw = await rt.redis.get(keys.worker_info(rt.token))
        ttl = await rt.redis.pttl(keys.worker_info(rt.token))
        assert seen is not None and before * 1000 - 1 <= seen <= time.time() * 1000 + 1
        return heartbeat.parse_info(raw), ttl, seen

    try:
        info, ttl, _ = asyncio.run(main())
    finally:
        heartbeat.remember_node(None)
    assert info is not None
    assert info.node == "w1@box"
    assert info.queues == ("ses.bulk.tls", "ses.tx.tls")
    assert info.capacity == 2
    assert [(p.profile, p.size, p.in_use) for p in info.pools] == [("", 7, 0), ("eu", 3, 0)]
    assert 0 < ttl <= heartbeat.KEEP_S * 1000


def test_a_clean_stop_removes_the_description() -> None:
    rt = FakeRuntime()

    async def main() -> tuple[int, int]:
        dispatcher = Dispatcher(rt, lambda job: None)  # type: ignore[arg-type]
        await dispatcher._heartbeat()
        rt.stopping = True
        await dispatcher.run_forever()  # stopping: no round, only the clean-up
        keys = rt.store.keys
        return (
            await rt.redis.zcard(keys.workers_seen()),
            await rt.redis.exists(keys.worker_info(rt.token)),
        )

    assert asyncio.run(main()) == (0, 0)


def test_unreadable_descriptions_are_none() -> None:
    assert heartbeat.parse_info(None) is None
    assert heartbeat.parse_info(b"not json") is None
    assert heartbeat.parse_info(b"[1, 2]") is None
