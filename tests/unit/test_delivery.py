"""The delivery core's branches, in seconds: fakes for the pool, limiter and quota; the real
status store scripts on fakeredis; Redis faults injected per call.

Invariants checked after every run: each recipient reached the endpoint at most once (and
exactly once when it should have), counters add up, and every claimed message is final,
parked, or in a ledger entry (a follow-up batch) — never dropped.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ReadOnlyError, RedisError, ResponseError

from ses_tasks.config import Settings
from ses_tasks.limits.quota import QuotaDecision
from ses_tasks.limits.ratelimit import Priority, YieldRequested
from ses_tasks.message.spec import CampaignTemplate
from ses_tasks.smtp.replies import SendResult
from ses_tasks.states import CampaignState, MessageState, Outcome
from ses_tasks.store.tracking import COUNTERS, AsyncStatusStore, LedgerEntry, StatusStore
from ses_tasks.worker.delivery import (
    BatchItem,
    BatchJob,
    Policy,
    RetryKind,
    StoreUnavailableError,
    decide,
    deliver,
)

# decide(): the one copy of the outcome policy ---------------------------------------------

POLICY = Policy(max_attempts=3)


@pytest.mark.parametrize(
    ("outcome", "attempts", "resend", "state", "retry", "after", "keep_row"),
    [
        (Outcome.SENT, 0, False, MessageState.SENT, RetryKind.NONE, 0, False),
        (Outcome.THROTTLED, 2, False, MessageState.RETRYING, RetryKind.THROTTLE, 2, False),
        (Outcome.QUOTA_EXHAUSTED, 2, False, MessageState.DEFERRED, RetryKind.QUOTA, 2, False),
        (Outcome.FATAL, 0, False, MessageState.DEFERRED, RetryKind.ENDPOINT, 0, False),
        (Outcome.PERMANENT, 0, False, MessageState.FAILED, RetryKind.NONE, 0, True),
        (Outcome.TRANSIENT, 0, False, MessageState.RETRYING, RetryKind.BACKOFF, 1, False),
        (Outcome.TRANSIENT, 1, False, MessageState.RETRYING, RetryKind.BACKOFF, 2, False),
        (Outcome.TRANSIENT, 2, False, MessageState.FAILED, RetryKind.NONE, 3, True),
        (Outcome.UNKNOWN, 0, False, MessageState.UNKNOWN, RetryKind.NONE, 1, True),
        (Outcome.UNKNOWN, 0, True, MessageState.RETRYING, RetryKind.BACKOFF, 1, False),
        (Outcome.UNKNOWN, 2, True, MessageState.UNKNOWN, RetryKind.NONE, 3, True),
    ],
)
def test_decide(outcome, attempts, resend, state, retry, after, keep_row):
    policy = Policy(max_attempts=3, resend_unknown=resend)
    d = decide(outcome, attempts, policy)
    assert (d.state, d.retry, d.attempts, d.keep_row) == (state, retry, after, keep_row)


def test_every_outcome_has_a_decision():
    for outcome in Outcome:
        assert decide(outcome, 0, POLICY).state in MessageState


def test_backoff_is_capped_and_jittered():
    policy = Policy(retry_base_s=1, retry_max_s=8)
    assert all(0.75 <= policy.backoff_s(1) <= 1.25 for _ in range(50))
    assert all(6 <= policy.backoff_s(10) <= 10 for _ in range(50))


# Fakes -----------------------------------------------------------------------------------


@dataclass
class FakePool:
    """Answers per recipient from a script of outcomes (default: sent)."""

    script: dict[str, list[Outcome]] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    async def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        self.calls += 1
        await asyncio.sleep(0)
        outcome = (self.script.get(recipients[0]) or [Outcome.SENT]).pop(0)
        if outcome in (Outcome.SENT, Outcome.UNKNOWN):
            for r in recipients:
                self.sent[r] += 1
        code = {Outcome.SENT: 250, Outcome.THROTTLED: 454, Outcome.TRANSIENT: 451}.get(outcome, 554)
        ses_id = f"ses-{self.calls}" if outcome is Outcome.SENT else None
        return SendResult(outcome, code, outcome.value, ses_id)


@dataclass
class FakeLimiter:
    throttles: int = 0
    #: Raise YieldRequested at this acquire (1-based), as the dispatcher's request would.
    yield_at: int | None = None
    acquires: int = 0

    async def acquire(
        self, n: int, *, priority: Priority = Priority.BULK, campaign: str = ""
    ) -> float:
        self.acquires += 1
        if self.acquires == self.yield_at:
            raise YieldRequested("make room")
        return 0.0

    async def on_throttle(self) -> float:
        self.throttles += 1
        return 1.0


@dataclass
class FakeQuota:
    left: int = 10**9
    released: int = 0

    async def try_consume(self, n: int) -> QuotaDecision:
        if n > self.left:
            return QuotaDecision(granted=False, used=0, limit=None, retry_after_s=30.0)
        self.left -= n
        return QuotaDecision(granted=True, used=n, limit=None, retry_after_s=0.0)

    async def release(self, n: int) -> int:
        self.released += n
        self.left += n
        return self.left

    async def mark_exhausted(self) -> float:
        self.left = 0
        return 30.0


class Faulty:
    """Wraps an object; its async methods raise ``errors[name]`` on the listed call numbers."""

    def __init__(self, inner: Any, faults: dict[str, tuple[set[int], Exception]]) -> None:
        self._inner = inner
        self._faults = faults
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._faults:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            calls, exc = self._faults[name]
            if self.calls[name] in calls:
                raise exc
            return await attr(*args, **kwargs)

        return call


@dataclass
class Runtime:
    settings: Settings
    store: Any
    limiter: Any
    quota: Any
    pool: Any
    token: str = "proc"
    templates: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def make_runtime(server: fakeredis.FakeServer, **overrides: Any) -> Runtime:
    settings = Settings(
        host="localhost",
        port=465,
        claim_lease_s=overrides.pop("claim_lease_s", 30.0),
        store_retry_s=overrides.pop("store_retry_s", 2.0),
        max_attempts=overrides.pop("max_attempts", 3),
        retry_base_s=0.01,
        retry_max_s=1.0,
        pool_size=overrides.pop("pool_size", 4),
        max_send_rate=1000,
    )
    store = AsyncStatusStore(fakeredis.FakeAsyncRedis(server=server), key_prefix="t")
    return Runtime(settings, store, FakeLimiter(), FakeQuota(), FakePool(), **overrides)


def sync_store(server: fakeredis.FakeServer) -> StatusStore:
    return StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t")


def new_campaign(server: fakeredis.FakeServer, n: int, cid: str = "c1") -> BatchJob:
    store = sync_store(server)
    template = CampaignTemplate(from_="a@example.com", subject="Hi", text="Hello")
    store.create_campaign(cid, template=template.to_dict())
    items = tuple(BatchItem(i, f"r{i}@example.com") for i in range(n))
    job = BatchJob(cid, items, "b0")
    store.add_queued(cid, n)
    store.register_batch(cid, LedgerEntry("b0", job.payload()))
    store.finish_enqueue(cid)
    return job


def counts(server: fakeredis.FakeServer, cid: str = "c1") -> dict[str, int]:
    status = sync_store(server).campaign_status(cid)
    assert sum(status.counts[n] for n in COUNTERS) == status.total
    return {k: v for k, v in status.counts.items() if v}


def ledger(server: fakeredis.FakeServer, cid: str = "c1") -> set[str]:
    store = sync_store(server)
    return {k.decode() for k in store.redis.hkeys(store.keys.batches(cid))}


def run(rt: Runtime, job: BatchJob):
    return asyncio.run(deliver(rt, job))


def drain(rt: Runtime, job: BatchJob, *, rounds: int = 10) -> None:
    """Deliver, then each follow-up in turn (as the task layer would), until none is left."""
    jobs = [job]
    for _ in range(rounds):
        if not jobs:
            return
        follow = []
        for j in jobs:
            follow += [f.job for f in run(rt, j).follow_ups]
        jobs = follow
    raise AssertionError("follow-ups never ended")


# Branches ---------------------------------------------------------------------------------


def test_all_sent_settles_the_batch(server):
    job = new_campaign(server, 7)
    rt = make_runtime(server)
    report = run(rt, job)
    assert report.sent == 7 and not report.follow_ups
    assert counts(server) == {"sent": 7}
    assert ledger(server) == set()
    assert sync_store(server).campaign_status("c1").state is CampaignState.COMPLETED
    assert set(rt.pool.sent.values()) == {1}


def test_transient_failures_retry_then_fail_with_their_row(server):
    job = new_campaign(server, 3)
    rt = make_runtime(server, max_attempts=2)
    rt.pool.script = {
        "r0@example.com": [Outcome.TRANSIENT, Outcome.SENT],
        "r1@example.com": [Outcome.TRANSIENT, Outcome.TRANSIENT],
    }
    report = run(rt, job)
    assert [len(f.job.items) for f in report.follow_ups] == [2]
    assert ledger(server) == {report.follow_ups[0].job.batch_id}
    assert counts(server) == {"sent": 1, "retrying": 2}
    drain(rt, report.follow_ups[0].job)
    assert counts(server) == {"sent": 2, "failed": 1}
    record = sync_store(server).message_status("c1.1")
    assert "gave up after 2 attempts" in record.reason and record.row[1] == "r1@example.com"
    assert ledger(server) == set()


def test_a_throttle_slows_the_fleet_once_per_batch_and_retries(server):
    job = new_campaign(server, 4)
    rt = make_runtime(server)
    rt.pool.script = {f"r{i}@example.com": [Outcome.THROTTLED] for i in range(3)}
    drain(rt, job)
    assert rt.limiter.throttles == 1
    assert counts(server) == {"sent": 4} and set(rt.pool.sent.values()) == {1}
    assert rt.quota.released == 3  # SES did not take the throttled ones


def test_an_endpoint_refusal_pauses_the_campaign_and_parks_the_rest(server):
    job = new_campaign(server, 6)
    rt = make_runtime(server)
    rt.pool.script = {"r0@example.com": [Outcome.FATAL]}
    report = run(rt, job)
    assert report.stopped == "fatal"
    status = sync_store(server).campaign_status("c1")
    assert status.state is CampaignState.PAUSED and "endpoint refused" in status.reason
    sent = sum(rt.pool.sent.values())
    assert counts(server) == {"sent": sent, "deferred": 6 - sent}
    # Resume hands the parked messages back; they are sent once.
    entries = sync_store(server).resume("c1")
    for entry in entries:
        drain(rt, BatchJob.from_payload("c1", entry.batch_id, entry.payload))
    assert counts(server) == {"sent": 6} and set(rt.pool.sent.values()) == {1}
    assert ledger(server) == set()


def test_quota_used_up_defers_with_a_follow_up(server):
    job = new_campaign(server, 8)
    rt = make_runtime(server)
    rt.quota.left = 4
    report = run(rt, job)
    assert counts(server) == {"sent": 4, "deferred": 4}
    (follow_up,) = report.follow_ups
    assert follow_up.why == "24-hour quota used up" and follow_up.countdown_s == 1.0  # capped
    rt.quota.left = 100
    drain(rt, follow_up.job)
    assert counts(server) == {"sent": 8}


def test_messages_another_worker_holds_are_left_to_it_and_followed_up(server):
    job = new_campaign(server, 3)
    sync_store(server).claim("c1", [("c1.1", "r1@example.com", False)], lease_s=60, token="other")
    rt = make_runtime(server)
    report = run(rt, job)
    assert rt.pool.sent["r1@example.com"] == 0
    # The batch's entry stays for the run holding c1.1 to settle (removing it would free a
    # live batch's entry and its dispatch credit); it covers c1.1 should that run die.
    assert report.follow_ups == [] and ledger(server) == {"b0"}
    assert counts(server) == {"sent": 2, "sending": 1}
    # Without an entry (a task of an older release) a follow-up covers them instead.
    legacy = run(make_runtime(server), replace(job, batch_id=""))
    (follow_up,) = legacy.follow_ups
    assert [i.seq for i in follow_up.job.items] == [1] and follow_up.why == "held by another worker"


def test_a_paused_campaign_parks_and_a_cancelled_one_cancels(server):
    job = new_campaign(server, 3)
    store = sync_store(server)
    store.pause("c1")
    rt = make_runtime(server)
    run(rt, job)
    assert counts(server) == {"deferred": 3} and rt.pool.calls == 0
    assert store.cancel("c1") == 3
    assert counts(server) == {"cancelled": 3}


def test_paused_transactional_mail_is_deferred_with_a_retry_not_parked(server):
    store = sync_store(server)
    spec = {"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "text": "t"}
    item = BatchItem("m1", "b@example.com", {}, 0, spec)
    job = BatchJob("transactional", (item,), "transactional.m1", Priority.TRANSACTIONAL)
    store.enqueue_one("transactional.m1", "b@example.com", job.payload())
    store.pause("transactional")
    rt = make_runtime(server)
    report = run(rt, job)
    assert report.record["state"] == "deferred" and rt.pool.calls == 0
    (follow_up,) = report.follow_ups
    assert follow_up.job.batch_id == "transactional.m1"
    assert ledger(server, "transactional") == {"transactional.m1"}
    sync_store(server).redis.hset(store.keys.campaign("transactional"), "state", "running")
    report = run(rt, follow_up.job)
    assert report.record["state"] == "sent" and not report.follow_ups
    assert ledger(server, "transactional") == set()


def test_a_copy_of_a_settled_batch_sends_nothing(server):
    job = new_campaign(server, 3)
    rt = make_runtime(server)
    run(rt, job)
    run(rt, job)  # the sweeper's copy, or a duplicated delivery, arriving late
    assert set(rt.pool.sent.values()) == {1} and rt.pool.calls == 3


# Redis faults at each call site ----------------------------------------------------------

FAULTS = {
    "connection": RedisConnectionError("Connection reset by peer"),
    "READONLY": ReadOnlyError("You can't write against a read only replica."),
    "NOPERM": NoPermissionError("this user has no permissions"),
    "script error": ResponseError("Error running script: boom"),
}
STORE_SITES = ["suppressed", "claim", "template", "finish", "renew", "park"]


@pytest.mark.parametrize("error", list(FAULTS))
@pytest.mark.parametrize("site", STORE_SITES)
def test_brief_store_faults_are_ridden_out_in_place(server, site, error):
    job = new_campaign(server, 12)
    rt = make_runtime(server, claim_lease_s=0.5)  # renewals happen during the batch
    rt.store = Faulty(rt.store, {site: ({1, 2, 4}, FAULTS[error])})
    rt.pool.script = {"r3@example.com": [Outcome.TRANSIENT]}
    drain(rt, job)
    assert counts(server) == {"sent": 12}
    assert set(rt.pool.sent.values()) == {1}, "a live worker sent twice"
    assert ledger(server) == set()


@pytest.mark.parametrize("site", ["try_consume", "release", "mark_exhausted"])
def test_brief_quota_faults_are_ridden_out(server, site):
    job = new_campaign(server, 9)
    rt = make_runtime(server)
    rt.quota = Faulty(rt.quota, {site: ({1, 2}, RedisConnectionError("down"))})
    rt.pool.script = {"r2@example.com": [Outcome.THROTTLED]}
    drain(rt, job)
    assert counts(server) == {"sent": 9} and set(rt.pool.sent.values()) == {1}


def test_a_claim_that_cannot_be_made_sends_nothing_and_raises(server):
    job = new_campaign(server, 3)
    rt = make_runtime(server, store_retry_s=0.2)
    rt.store = Faulty(rt.store, {"claim": (set(range(1, 1000)), RedisError("down"))})
    with pytest.raises(StoreUnavailableError):
        run(rt, job)
    assert rt.pool.calls == 0 and counts(server) == {"queued": 3}
    assert ledger(server) == {"b0"}  # still there for the retry or the sweeper


def test_outcomes_that_cannot_be_recorded_are_never_resent_by_this_worker(server):
    """Redis down past the budget after the sends: the batch stays in the ledger under its
    lease; only after the lease (a dead worker's case) is it taken over, as recovered."""
    job = new_campaign(server, 4)
    rt = make_runtime(server, store_retry_s=0.1, claim_lease_s=0.2)
    rt.store = Faulty(rt.store, {"finish": (set(range(1, 1000)), RedisError("down"))})
    report = run(rt, job)
    assert report.unrecorded == 4 and report.follow_ups == []
    assert counts(server) == {"sending": 4} and ledger(server) == {"b0"}
    assert sum(rt.pool.sent.values()) == 4


def test_a_lease_lost_mid_batch_stops_those_messages(server):
    job = new_campaign(server, 6)
    rt = make_runtime(server, claim_lease_s=0.3, pool_size=1)
    store = sync_store(server)
    claim = rt.store.claim

    async def claim_then_lose_one(*args: Any, **kwargs: Any) -> Any:
        reply = await claim(*args, **kwargs)
        # Another worker takes c1.5 over (as if our lease had lapsed).
        store.redis.hset(store.keys.message("c1.5"), "lease_token", "thief")
        return reply

    rt.store.claim = claim_then_lose_one
    renew = rt.store.renew
    renewed = asyncio.Event()

    async def renew_and_note(*args: Any, **kwargs: Any) -> Any:
        reply = await renew(*args, **kwargs)
        renewed.set()
        return reply

    rt.store.renew = renew_and_note
    original_send = rt.pool.send

    async def slow_send(envelope_from, recipients, data):
        if recipients[0] in ("r3@example.com", "r4@example.com"):
            # Condition, not timing: the lease keeper (every 0.1 s) has renewed, and so
            # learned of the takeover, before the chunk holding r5 may start (two chunks
            # of one are in flight at a time: r3 and r4 hold both places).
            await asyncio.wait_for(renewed.wait(), timeout=10)
        return await original_send(envelope_from, recipients, data)

    rt.pool.send = slow_send
    report = run(rt, job)
    assert rt.pool.sent["r5@example.com"] == 0
    assert any(f.why == "taken over" for f in report.follow_ups)
    assert sum(rt.pool.sent.values()) == 5


def test_a_send_that_raises_is_unknown_and_the_rest_of_its_chunk_is_recorded(server):
    job = new_campaign(server, 8)
    rt = make_runtime(server)
    original_send = rt.pool.send

    async def send(envelope_from, recipients, data):
        if recipients[0] == "r2@example.com":
            raise RuntimeError("pool is closed")
        return await original_send(envelope_from, recipients, data)

    rt.pool.send = send
    report = run(rt, job)
    assert counts(server) == {"sent": 7, "unknown": 1}
    assert sync_store(server).message_status("c1.2").reason == "send failed: RuntimeError"
    assert ledger(server) == set() and not report.follow_ups
    run(rt, job)  # a late copy sends nothing again
    assert set(rt.pool.sent.values()) == {1} and sum(rt.pool.sent.values()) == 7


def test_a_batch_asked_to_make_room_hands_the_rest_back_and_gives_back_its_quota(server):
    job = new_campaign(server, 10)
    rt = make_runtime(server, pool_size=4)  # chunks of 4
    rt.limiter.yield_at = 2
    report = run(rt, job)
    assert report.stopped == "yield" and report.sent == 4
    (follow_up,) = report.follow_ups
    assert [i.seq for i in follow_up.job.items] == list(range(4, 10))
    assert follow_up.why == "handed back"
    assert counts(server) == {"sent": 4, "queued": 6}
    assert ledger(server) == {follow_up.job.batch_id}
    # Back in the backlog, first in line: the dispatcher hands it out within its window,
    # nobody publishes it directly and the sweeper never sees it due.
    store = sync_store(server)
    assert follow_up.stored
    assert store.redis.zrange(store.keys.backlog("c1"), 0, -1) == [follow_up.job.batch_id.encode()]
    assert store.redis.zcard(store.keys.due("c1")) == 0
    assert rt.quota.released == 4  # the refused chunk's units went back
