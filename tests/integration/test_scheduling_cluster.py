"""Scheduled sends on a real 3-node Redis Cluster: every script touches only its KEYS (the
key guard of ``test_redis_cluster``), and the scheduler's index, a key of its own slot, is
written with separate commands."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis

from ses_tasks.config import Settings
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.message.spec import CampaignTemplate
from ses_tasks.produce.campaigns import CampaignProducer
from ses_tasks.states import MessageState
from ses_tasks.store.tracking import START_PREFIX, LedgerEntry, Settlement, StatusStore

from . import test_redis_cluster as base
from .test_redis_cluster import LocalCluster, StubCelery, assert_guarded, async_store

# The fixtures of test_redis_cluster: a 3-node cluster, a guarded client, a key prefix.
cluster, rc, prefix, store = base.cluster, base.rc, base.prefix, base.store


def test_scheduled_single_messages_and_campaigns_on_a_cluster(
    cluster: LocalCluster, rc: redis.RedisCluster, store: StatusStore, prefix: str
) -> None:
    soon = int(time.time() * 1000) + 300
    later = soon + 600_000
    mids = [f"{TRANSACTIONAL}.{uuid.uuid4().hex}" for _ in range(2)]
    for mid, at in zip(mids, (soon, later), strict=True):
        done = store.enqueue_single(mid, "t@example.com", {"items": [], "n": mid}, send_at_ms=at)
        assert done.new and done.waiting_until_ms == at
    assert store.message_status(mids[1]).send_at == later / 1000

    settings = Settings(batch_size=3, key_prefix=prefix, username="u", password="p")
    producer = CampaignProducer(settings, store, StubCelery())  # type: ignore[arg-type]
    template = CampaignTemplate(from_="a@example.com", subject="Hi", text="Hello")
    producer.send(template, ["a@example.com", "b@example.com"], campaign_id="sch", send_at_ms=soon)
    assert store.campaign_status("sch").scheduled
    time.sleep(0.4)  # past `soon` on the servers' clocks (the scripts read TIME)

    async def run() -> None:
        async with async_store(cluster, prefix) as astore:
            assert_guarded(astore._schedule_due, astore._take_scheduled, astore._dispatch)
            next_in, members = await astore.schedule_due(limit=10)
            assert sorted(members) == sorted([mids[0], START_PREFIX + "sch"])
            assert next_in is not None and next_in > 500
            _, entries, gone = await astore.take_scheduled(TRANSACTIONAL, [mids[0]])
            assert [e.batch_id for e in entries] == [mids[0]] and gone == []
            await astore.unschedule(members)
            reply = await astore.dispatch("sch", 5, unclaimed_after_s=60)
            assert [e.batch_id for e in reply.taken] == ["b0"] and reply.starts_in_s == 0
            # A single message handed back unpublished: due now and indexed.
            entry = LedgerEntry(mids[1], {"items": []}, stored=True)
            await astore.finish(TRANSACTIONAL, [], settle=Settlement(follow_ups=[entry]))
            _, again = await astore.schedule_due(limit=10)
            assert again == [mids[1]]

    asyncio.run(run())
    assert store.message_status(mids[0]).state is MessageState.QUEUED
