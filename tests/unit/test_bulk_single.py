"""A single message sent with ``priority="bulk"``, through the delivery core on fakeredis.

It takes tokens in the limiter's bulk lane and travels on the bulk queue, and it stays a
single message in every other way: no row kept, a sender refusal fails it (it does not
pause the standing campaign), a pause defers it and a fatal endpoint error retries it, and
its record is the batch's report: ``BatchJob.single`` (``campaign_id == TRANSACTIONAL``)
tells "a single message" apart from "the transactional lane" (``priority``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.queue.app import BATCH_TASK, MESSAGE_TASK
from ses_tasks.queue.publish import task_call
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.smtp.replies import SendResult
from ses_tasks.states import CampaignState, MessageState, Outcome
from ses_tasks.worker.delivery import BatchItem, BatchJob, deliver

from .test_delivery import FakeLimiter, make_runtime, sync_store


@dataclass
class RecordingLimiter(FakeLimiter):
    calls: list[tuple[Priority, str]] = field(default_factory=list)

    async def acquire(
        self, n: int, *, priority: Priority = Priority.BULK, campaign: str = ""
    ) -> float:
        self.calls.append((priority, campaign))
        return await super().acquire(n, priority=priority, campaign=campaign)


@dataclass
class AnsweringPool:
    """Answers every send with ``result``."""

    result: SendResult
    sends: int = 0

    async def send(self, envelope_from: str, recipients: Any, data: bytes) -> SendResult:
        await asyncio.sleep(0)
        self.sends += 1
        return self.result


SENT = SendResult(Outcome.SENT, 250, "Ok", "ses-1")
REFUSED = SendResult(
    Outcome.PERMANENT,
    554,
    "Message rejected: Email address is not verified. The following identities failed the "
    "check in region US-EAST-1: x@example.com",
    identity="x@example.com",
)
FATAL = SendResult(Outcome.FATAL, 535, "Authentication Credentials Invalid")


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def runtime(server: fakeredis.FakeServer, answer: SendResult) -> Any:
    rt = make_runtime(server)
    rt.pool = AnsweringPool(answer)
    rt.limiter = RecordingLimiter()
    return rt


def bulk_single(server: fakeredis.FakeServer, mid: str = "transactional.b1") -> BatchJob:
    spec = {"from": "x@example.com", "to": ["b@example.com"], "subject": "s", "text": "t"}
    item = BatchItem(mid.split(".", 1)[1], "b@example.com", {}, 0, spec)
    job = BatchJob(TRANSACTIONAL, (item,), mid, Priority.BULK)
    sync_store(server).enqueue_single(mid, "b@example.com", job.payload())
    return job


def test_a_bulk_single_message_goes_to_the_bulk_queue_and_the_bulk_lane(server):
    job = bulk_single(server)
    name, kwargs = task_call(job, PortMode.TLS)
    assert name == BATCH_TASK and kwargs["queue"] == "ses.tls"
    transactional = BatchJob(TRANSACTIONAL, job.items, job.batch_id, Priority.TRANSACTIONAL)
    assert task_call(transactional, PortMode.TLS)[0] == MESSAGE_TASK
    rt = runtime(server, SENT)
    report = asyncio.run(deliver(rt, job))
    assert report.sent == 1
    (priority, _campaign), *_ = rt.limiter.calls
    assert priority is Priority.BULK
    record = sync_store(server).message_status(job.batch_id)
    assert record.state is MessageState.SENT


def test_a_failed_bulk_single_message_keeps_no_body(server):
    job = bulk_single(server)
    rt = runtime(server, SendResult(Outcome.PERMANENT, 550, "no"))
    asyncio.run(deliver(rt, job))
    record = sync_store(server).message_status(job.batch_id)
    assert record.state is MessageState.FAILED and record.row is None


def test_a_bulk_single_message_reports_its_record(server):
    rt = runtime(server, SENT)
    report = asyncio.run(deliver(rt, bulk_single(server)))
    assert report.record is not None and report.record["state"] == "sent"


def test_a_refused_sender_fails_a_bulk_single_message_without_pausing_the_others(server):
    rt = runtime(server, REFUSED)
    job = bulk_single(server)
    asyncio.run(deliver(rt, job))
    store = sync_store(server)
    assert store.message_status(job.batch_id).state is MessageState.FAILED
    assert store.campaign_status(TRANSACTIONAL).state is not CampaignState.PAUSED


def test_a_fatal_endpoint_error_defers_a_bulk_single_message_without_pausing_the_others(
    server,
):
    rt = runtime(server, FATAL)
    job = bulk_single(server)
    report = asyncio.run(deliver(rt, job))
    store = sync_store(server)
    assert store.message_status(job.batch_id).state is MessageState.DEFERRED
    assert store.campaign_status(TRANSACTIONAL).state is not CampaignState.PAUSED
    assert [f.job.batch_id for f in report.follow_ups] == [job.batch_id]


def test_a_paused_standing_campaign_defers_a_bulk_single_message_and_retries_it(server):
    store = sync_store(server)
    job = bulk_single(server)
    store.pause(TRANSACTIONAL)
    rt = runtime(server, SENT)
    report = asyncio.run(deliver(rt, job))
    assert store.message_status(job.batch_id).state is MessageState.DEFERRED
    assert [f.job.batch_id for f in report.follow_ups] == [job.batch_id]  # retried, not parked
    assert store.redis.llen(store.keys.parked(TRANSACTIONAL)) == 0
