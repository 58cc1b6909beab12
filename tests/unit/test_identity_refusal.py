"""SES refusing one sender identity stops only what is sent from it, in the delivery core.

The pool here answers like the real one does for an IAM denial on
``identity/denied@example.com``: ``PERMANENT`` with ``identity`` set (classification is in
``test_replies.py``; real processes in ``tests/e2e/test_identity_denial.py``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import fakeredis
import pytest

from ses_tasks.limits.ratelimit import Priority
from ses_tasks.message.spec import CampaignTemplate
from ses_tasks.smtp.replies import SendResult
from ses_tasks.states import CampaignState, MessageState, Outcome
from ses_tasks.worker.delivery import BatchItem, BatchJob, deliver

from .test_delivery import counts, ledger, make_runtime, sync_store

DENIED = "denied@example.com"
DENIAL = (
    "Message rejected: User 'arn:aws:iam::123456789012:user/ses-smtp' is not authorized to "
    "perform 'ses:SendRawEmail' on resource "
    f"'arn:aws:ses:us-east-1:123456789012:identity/{DENIED}'"
)


@dataclass
class DenyingPool:
    """Refuses mail from the denied identities, sends the rest."""

    denied: set[str] = field(default_factory=lambda: {DENIED})
    sent: Counter[str] = field(default_factory=Counter)
    refused: int = 0

    async def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        await asyncio.sleep(0)
        if envelope_from in self.denied:
            self.refused += 1
            return SendResult(Outcome.PERMANENT, 554, DENIAL, identity=envelope_from)
        for r in recipients:
            self.sent[r] += 1
        return SendResult(Outcome.SENT, 250, "Ok", f"ses-{sum(self.sent.values())}")


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def campaign(server: fakeredis.FakeServer, cid: str, sender: str, n: int) -> BatchJob:
    store = sync_store(server)
    template = CampaignTemplate(from_=sender, subject="Hi", text="Hello")
    store.create_campaign(cid, template=template.to_dict())
    job = BatchJob(cid, tuple(BatchItem(i, f"{cid}-r{i}@example.com") for i in range(n)), "")
    store.add_queued(cid, n)
    store.finish_enqueue(cid)
    return job


def test_a_denied_identity_pauses_its_campaign_only(server):
    rt = make_runtime(server)
    rt.pool = DenyingPool()
    a = campaign(server, "a", DENIED, 10)
    b = campaign(server, "b", "news@example.com", 10)

    report = asyncio.run(deliver(rt, a))
    assert report.stopped == "identity" and report.sent == 0
    status = sync_store(server).campaign_status("a")
    assert status.state is CampaignState.PAUSED
    assert status.reason.startswith(f"sender identity {DENIED} refused: 554 ")
    assert status.meta["pause_kind"] == "identity"
    # Not failed one by one: every message is parked, ready for a resume.
    assert counts(server, "a") == {"deferred": 10}
    # The batch stopped at the first refusals (the two chunks in flight), not all ten.
    assert rt.pool.refused <= 2 * rt.settings.pool_size < 10

    report = asyncio.run(deliver(rt, b))
    assert report.sent == 10 and report.stopped is None
    assert sync_store(server).campaign_status("b").state is CampaignState.COMPLETED

    # Once the identity is allowed again, a resume sends campaign A's messages once each.
    rt.pool.denied.clear()
    for entry in sync_store(server).resume("a"):
        asyncio.run(deliver(rt, BatchJob.from_payload("a", entry.batch_id, entry.payload)))
    assert counts(server, "a") == {"sent": 10}
    assert set(rt.pool.sent.values()) == {1} and len(rt.pool.sent) == 20


def test_transactional_mail_denied_by_iam_is_deferred_and_retried_not_failed(server):
    """SES names the sender identity in every IAM denial, even when the policy denies all
    identities (a detached policy): a password reset must wait, not fail for good."""
    store = sync_store(server)
    rt = make_runtime(server)
    rt.pool = DenyingPool()
    spec = {"from": DENIED, "to": ["b@example.com"], "subject": "s", "text": "t"}
    item = BatchItem("m1", "b@example.com", {}, 0, spec)
    job = BatchJob("transactional", (item,), "transactional.m1", Priority.TRANSACTIONAL)
    store.enqueue_one("transactional.m1", "b@example.com", job.payload())

    report = asyncio.run(deliver(rt, job))
    assert report.record is not None
    assert (report.record["state"], report.record["code"]) == ("deferred", 554)
    assert report.record["reason"].startswith(f"sender identity {DENIED} refused: 554 ")
    [follow] = report.follow_ups
    assert follow.countdown_s == rt.settings.retry_max_s
    assert follow.why == "sender not authorized (IAM)"
    record = store.message_status("transactional.m1")
    assert record is not None and record.state is MessageState.DEFERRED
    # The standing transactional campaign is not paused: other senders' mail goes on.
    assert store.campaign_status("transactional").state is not CampaignState.PAUSED
    ok = BatchItem("m2", "c@example.com", {}, 0, {**spec, "from": "shop@example.com"})
    job2 = BatchJob("transactional", (ok,), "transactional.m2", Priority.TRANSACTIONAL)
    store.enqueue_one("transactional.m2", "c@example.com", job2.payload())
    assert asyncio.run(deliver(rt, job2)).record["state"] == "sent"
    # Once the policy is fixed, the retry sends it.
    rt.pool.denied.clear()
    assert asyncio.run(deliver(rt, follow.job)).record["state"] == "sent"


def test_transactional_mail_from_an_unverified_sender_fails_without_retrying(server):
    store = sync_store(server)
    rt = make_runtime(server)

    class Unverified(DenyingPool):
        async def send(self, envelope_from, recipients, data):
            return SendResult(
                Outcome.PERMANENT,
                554,
                "Message rejected: Email address is not verified. The following identities "
                f"failed the check in region US-EAST-1: {DENIED}",
                identity=DENIED,
            )

    rt.pool = Unverified()
    spec = {"from": DENIED, "to": ["b@example.com"], "subject": "s", "text": "t"}
    item = BatchItem("m1", "b@example.com", {}, 0, spec)
    job = BatchJob("transactional", (item,), "transactional.m1", Priority.TRANSACTIONAL)
    store.enqueue_one("transactional.m1", "b@example.com", job.payload())
    report = asyncio.run(deliver(rt, job))
    assert report.record is not None and report.record["state"] == "failed"
    assert report.follow_ups == [] and ledger(server, "transactional") == set()
