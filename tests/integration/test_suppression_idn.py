"""IDN recipients against the suppression list on real Redis: the status store's lookup and
a whole claim (``deliver``) treat ``user@bücher.example`` and ``user@xn--bcher-kva.example``
(the form SES reports) as one address, whichever form was suppressed.

Regression: the claim looked the raw recipient up lower-cased only, so a unicode recipient
was sent although feedback had suppressed its Punycode form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from ses_tasks.config import Settings
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.message.spec import CampaignTemplate
from ses_tasks.states import MessageState
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import AsyncStatusStore, LedgerEntry, StatusStore
from ses_tasks.worker.delivery import BatchItem, BatchJob, deliver

from ..conftest import REDIS_URL
from ..unit.test_delivery import FakeLimiter, FakePool, FakeQuota, Runtime

T = TypeVar("T")

UNICODE = "user@bücher.example"
PUNYCODE = "user@xn--bcher-kva.example"


def with_async_store(key_prefix: str, use: Callable[[AsyncStatusStore], Awaitable[T]]) -> T:
    async def run() -> T:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await use(AsyncStatusStore(client, key_prefix=key_prefix))
        finally:
            await client.aclose()

    return asyncio.run(run())


def deliver_on_redis(key_prefix: str, job: BatchJob) -> Runtime:
    """One batch through the real claim path (suppression check, claim script) on real
    Redis; the pool, limiter and quota are the unit tests' fakes."""
    settings = Settings(
        host="localhost", port=465, claim_lease_s=30, retry_base_s=0.01, max_send_rate=1000
    )

    async def use(store: AsyncStatusStore) -> Runtime:
        rt = Runtime(settings, store, FakeLimiter(), FakeQuota(), FakePool())
        await deliver(rt, job)
        return rt

    return with_async_store(key_prefix, use)


@pytest.fixture
def suppression(redis_client: redis.Redis, key_prefix: str) -> SuppressionList:
    return SuppressionList(redis_client, key_prefix=key_prefix)


@pytest.fixture
def store(redis_client: redis.Redis, key_prefix: str) -> StatusStore:
    return StatusStore(redis_client, key_prefix=key_prefix)


#: One address: as SES reports it, as rows and users write it, mixed case.
FORMS = [PUNYCODE, UNICODE, "User@BÜCHER.Example", "USER@XN--BCHER-KVA.EXAMPLE"]


@pytest.mark.parametrize("listed", FORMS)
def test_the_status_store_finds_an_idn_address_in_any_form(suppression, key_prefix, listed):
    suppression.add([listed], reason="bounce", source="feedback", overwrite=False)
    assert [e.email for e in suppression] == [PUNYCODE]
    recipients = [*FORMS, "other@bücher.example", "x@example.com"]
    flags = with_async_store(key_prefix, lambda s: s.suppressed(recipients))
    assert flags == [True] * len(FORMS) + [False, False]


def test_a_campaign_claim_suppresses_every_form_and_sends_the_rest(suppression, store, key_prefix):
    suppression.add([PUNYCODE], reason="bounce", source="feedback")  # as SES reports it
    suppression.add(["Bob@Bücher.example"], reason="added by user")  # by hand, unicode
    suppression.add(["carol@XN--BCHER-KVA.example"], reason="added by user")
    assert sorted(e.email for e in suppression) == [
        "bob@xn--bcher-kva.example",
        "carol@xn--bcher-kva.example",
        PUNYCODE,
    ]
    emails = [
        UNICODE,
        "bob@xn--bcher-kva.example",
        "Carol <carol@BÜCHER.example>",
        "dave@bücher.example",
    ]
    cid = "idn"
    template = CampaignTemplate(from_="news@example.com", subject="Hi", text="Hello")
    store.create_campaign(cid, template=template.to_dict())
    job = BatchJob(cid, tuple(BatchItem(i, e) for i, e in enumerate(emails)), "b0")
    store.add_queued(cid, len(emails))
    store.register_batch(cid, LedgerEntry("b0", job.payload()))
    store.finish_enqueue(cid)

    rt = deliver_on_redis(key_prefix, job)

    assert dict(rt.pool.sent) == {"dave@xn--bcher-kva.example": 1}
    states = [store.message_status(f"{cid}.{i}").state for i in range(len(emails))]
    assert states == [MessageState.SUPPRESSED] * 3 + [MessageState.SENT]
    counts = store.campaign_status(cid).counts
    assert (counts["suppressed"], counts["sent"]) == (3, 1)


def test_a_transactional_claim_drops_suppressed_idn_recipients(suppression, store, key_prefix):
    suppression.add(["User@Bücher.example"], reason="added by user")
    assert [e.email for e in suppression] == [PUNYCODE]
    spec = {
        "from": "a@example.com",
        "to": ["USER@bücher.example", "eve@bücher.example"],
        "subject": "s",
        "text": "t",
    }
    item = BatchItem("m1", spec["to"][0], {}, 0, spec)
    job = BatchJob("transactional", (item,), "transactional.m1", Priority.TRANSACTIONAL)
    store.enqueue_one("transactional.m1", item.email, job.payload())

    rt = deliver_on_redis(key_prefix, job)

    assert dict(rt.pool.sent) == {"eve@xn--bcher-kva.example": 1}
