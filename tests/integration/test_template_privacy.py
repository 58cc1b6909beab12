"""A completed campaign's template is dropped by a script that declares every key it
touches (checked with the cluster key guard), and only when nothing is left to retry."""

from __future__ import annotations

import asyncio
import uuid

import redis
import redis.asyncio as aioredis

from ses_tasks.states import MessageState
from ses_tasks.store.tracking import AsyncStatusStore, StatusStore, Transition

from ..conftest import REDIS_URL
from .test_redis_cluster import guard_scripts

TEMPLATE = {"from": "a@example.com", "subject": "s", "text": "t"}


def _campaign(r: redis.Redis, prefix: str, cid: str, state: MessageState) -> StatusStore:
    store = StatusStore(r, key_prefix=prefix, retention_s=3600)
    store.create_campaign(cid, template=TEMPLATE)
    store.add_queued(cid, 1)
    store.finish_enqueue(cid)
    store.finish(cid, [Transition(f"{cid}.0", state, 250, "ok", "ses-1")])
    return store


def test_completion_drops_the_template_only_without_failures():
    prefix = f"tpl-{uuid.uuid4().hex[:8]}"
    r = guard_scripts(redis.Redis.from_url(REDIS_URL))
    clean = _campaign(r, prefix, "clean", MessageState.SENT)
    failed = _campaign(r, prefix, "failed", MessageState.FAILED)
    assert clean.campaign_status("clean").state.value == "completed"
    assert clean.template("clean") == TEMPLATE  # finish alone touches no undeclared key

    async def drop() -> tuple[bool, bool]:
        client = guard_scripts(aioredis.Redis.from_url(REDIS_URL))
        try:
            store = AsyncStatusStore(client, key_prefix=prefix)
            return await store.drop_template_if_done("clean"), await store.drop_template_if_done(
                "failed"
            )
        finally:
            await client.aclose()

    try:
        assert asyncio.run(drop()) == (True, False)
        assert clean.template("clean") is None
        assert failed.template("failed") == TEMPLATE  # retry-failed still needs it
    finally:
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
