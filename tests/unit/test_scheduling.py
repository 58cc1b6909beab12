"""Per-call options: send_at, priority and profile checks, and the store and scheduler logic
behind scheduled sends (the Lua scripts on fakeredis)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fakeredis
import pytest

from ses_tasks.config import Settings
from ses_tasks.errors import ValidationError
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.produce.client import SesTasks
from ses_tasks.produce.options import check_priority, check_profile_name, parse_send_at
from ses_tasks.states import CampaignState, MessageState
from ses_tasks.store.tracking import (
    START_PREFIX,
    AsyncStatusStore,
    LedgerEntry,
    Settlement,
    StatusStore,
    Transition,
)
from ses_tasks.worker.delivery import BatchItem, BatchJob

DAY = 86400
NOW = 1_750_000_000.0


# send_at ----------------------------------------------------------------------------------


def test_send_at_takes_aware_datetimes_and_iso_strings_with_an_offset():
    at = datetime.fromtimestamp(NOW + 3600, tz=UTC)
    expected = int((NOW + 3600) * 1000)
    assert parse_send_at(at, retention_s=DAY, now=NOW) == expected
    paris = at.astimezone(timezone(timedelta(hours=2)))
    assert parse_send_at(paris, retention_s=DAY, now=NOW) == expected
    assert parse_send_at(paris.isoformat(), retention_s=DAY, now=NOW) == expected
    zulu = at.isoformat().replace("+00:00", "Z")
    assert parse_send_at(zulu, retention_s=DAY, now=NOW) == expected
    assert parse_send_at(None, retention_s=DAY, now=NOW) is None


def test_a_time_already_past_means_now():
    past = datetime.fromtimestamp(NOW - 5, tz=UTC)
    assert parse_send_at(past, retention_s=DAY, now=NOW) is None
    assert parse_send_at(datetime.fromtimestamp(NOW, tz=UTC), retention_s=DAY, now=NOW) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (datetime(2030, 1, 1, 9, 0), "no time zone"),
        ("2030-01-01T09:00:00", "no time zone"),
        ("2030-01-01", "no time zone"),
        ("next tuesday", "not an ISO-8601 time"),
        (1893456000, "not int"),
        (1893456000.0, "not float"),
    ],
)
def test_send_at_refuses_naive_unparsable_and_other_values_naming_the_field(value, words):
    with pytest.raises(ValidationError, match=words) as info:
        parse_send_at(value, retention_s=30 * DAY, now=NOW)
    assert info.value.field == "send_at"


def test_send_at_is_bounded_by_the_retention():
    limit = datetime.fromtimestamp(NOW + 30 * DAY, tz=UTC)
    assert parse_send_at(limit, retention_s=30 * DAY, now=NOW) == int((NOW + 30 * DAY) * 1000)
    beyond = datetime.fromtimestamp(NOW + 30 * DAY + 60, tz=UTC)
    with pytest.raises(ValidationError, match="at most 30 days ahead") as info:
        parse_send_at(beyond, retention_s=30 * DAY, now=NOW)
    assert info.value.field == "send_at" and "SES_TASKS_RETENTION_S" in str(info.value)


def test_priority_and_profile_are_checked_naming_the_field():
    assert check_priority("bulk") is Priority.BULK
    assert check_priority(" Transactional ") is Priority.TRANSACTIONAL
    assert check_priority(Priority.BULK) is Priority.BULK
    for bad in ("urgent", 1, None):
        with pytest.raises(ValidationError, match="'transactional' or 'bulk'") as info:
            check_priority(bad)  # type: ignore[arg-type]
        assert info.value.field == "priority"
    assert check_profile_name("eu") == "eu" and check_profile_name(None) == ""
    with pytest.raises(ValidationError, match="a string") as info:
        check_profile_name(3)
    assert info.value.field == "profile"


def client(**settings: Any) -> SesTasks:
    # Nothing listens on port 1: every check must come before Redis is touched.
    return SesTasks(
        Settings(
            host="localhost",
            port=465,
            redis_url="redis://127.0.0.1:1/0",
            broker_url="redis://127.0.0.1:1/0",
            **settings,
        )
    )


MESSAGE = dict(from_="a@example.com", to=["b@example.com"], subject="s", text="t")


@pytest.mark.parametrize(
    ("options", "field_name"),
    [
        ({"send_at": "2030-01-01T09:00:00"}, "send_at"),
        ({"send_at": datetime(2030, 1, 1)}, "send_at"),
        ({"send_at": "2999-01-01T00:00:00Z"}, "send_at"),
        ({"priority": "urgent"}, "priority"),
        ({"profile": "nope"}, "profile"),
        ({"profile": 7}, "profile"),
        ({"send_at": "soon", "priority": "bulk", "profile": "eu"}, "send_at"),
    ],
)
def test_send_email_refuses_bad_options_before_storing_anything(options, field_name):
    ses = client(profiles={"eu": {"region": "eu-west-1"}})
    with pytest.raises(ValidationError) as info:
        ses.send_email(**MESSAGE, **options)
    assert info.value.field == field_name


def test_send_campaign_refuses_a_bad_send_at_or_profile_before_storing_anything():
    ses = client()
    campaign = dict(from_="a@example.com", subject="s", text="t", recipients=[])
    with pytest.raises(ValidationError) as info:
        ses.send_campaign(**campaign, send_at="2030-01-01 09:00")
    assert info.value.field == "send_at"
    with pytest.raises(ValidationError) as info:
        ses.send_campaign(**campaign, send_at=datetime.now(UTC) + timedelta(days=31))
    assert info.value.field == "send_at"
    with pytest.raises(ValidationError) as info:
        ses.send_campaign(**campaign, profile="nope")
    assert info.value.field == "profile"


# The store ---------------------------------------------------------------------------------


def stores() -> tuple[StatusStore, AsyncStatusStore]:
    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    return sync, AsyncStatusStore(
        fakeredis.FakeAsyncRedis(server=server), key_prefix="t", retention_s=3600
    )


def single(mid: str, priority: Priority = Priority.TRANSACTIONAL, profile: str = "") -> BatchJob:
    spec = {"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "text": "t"}
    item = BatchItem(mid.split(".", 1)[1], "b@example.com", {}, 0, spec)
    return BatchJob(TRANSACTIONAL, (item,), mid, priority, profile)


def now_ms() -> int:
    return int(time.time() * 1000)


def scheduled(sync: StatusStore) -> dict[str, float]:
    return {
        m.decode(): s for m, s in sync.redis.zrange(sync.keys.scheduled(), 0, -1, withscores=True)
    }


def test_a_scheduled_message_waits_queued_with_its_send_at_and_entry_due_then():
    sync, _ = stores()
    at = now_ms() + 600_000
    job = single("transactional.s1", Priority.BULK, "eu")
    done = sync.enqueue_single("transactional.s1", "b@example.com", job.payload(), send_at_ms=at)
    assert (done.new, done.state, done.in_ledger, done.waiting_until_ms) == (
        True,
        MessageState.QUEUED,
        True,
        at,
    )
    record = sync.message_status("transactional.s1")
    assert record is not None and record.state is MessageState.QUEUED
    assert record.send_at == at / 1000 and record.to_dict()["send_at"] == at / 1000
    # Due at send_at (the sweeper's backstop), indexed for the scheduler at send_at.
    assert sync.redis.zscore(sync.keys.due(TRANSACTIONAL), "transactional.s1") == at
    assert scheduled(sync) == {"transactional.s1": at}
    # Its record outlives the wait: the retention counts from send_at.
    assert sync.redis.ttl(sync.keys.message("transactional.s1")) > 3600 + 590
    # The idempotency key's second call: not new, still waiting (the caller publishes
    # nothing), and the index entry is written again (a producer that died is repaired).
    sync.redis.delete(sync.keys.scheduled())
    again = sync.enqueue_single("transactional.s1", "b@example.com", job.payload(), send_at_ms=0)
    assert (again.new, again.waiting_until_ms) == (False, at)
    assert scheduled(sync) == {"transactional.s1": at}
    # Its payload keeps the lane and the profile for the scheduler's publish.
    payload = json.loads(sync.redis.hget(sync.keys.batches(TRANSACTIONAL), "transactional.s1"))
    assert payload["priority"] == "bulk" and payload["profile"] == "eu"


def test_an_unscheduled_message_is_due_after_the_publish_grace_and_not_indexed():
    sync, _ = stores()
    done = sync.enqueue_single(
        "transactional.n1", "b@example.com", single("transactional.n1").payload()
    )
    assert done.new and done.waiting_until_ms is None
    assert scheduled(sync) == {}
    assert sync.message_status("transactional.n1").send_at is None
    assert sync.enqueue_one("transactional.n1", "b@example.com", {}) == (
        False,
        MessageState.QUEUED,
        True,
    )


def test_the_shared_ledger_keys_are_kept_until_a_message_is_due_never_shortened():
    sync, _ = stores()
    sync.redis.hset(sync.keys.batches(TRANSACTIONAL), "x", "{}")
    sync.redis.expire(sync.keys.batches(TRANSACTIONAL), 10)
    at = now_ms() + 7200_000
    sync.enqueue_single("transactional.s2", "b@example.com", {"items": []}, send_at_ms=at)
    assert sync.redis.ttl(sync.keys.batches(TRANSACTIONAL)) > 7200 + 3500
    sync.redis.expire(sync.keys.batches(TRANSACTIONAL), 99999)
    sync.enqueue_single("transactional.s3", "b@example.com", {"items": []}, send_at_ms=at)
    assert sync.redis.ttl(sync.keys.batches(TRANSACTIONAL)) > 99000


def test_the_scheduler_takes_due_entries_once_and_drops_gone_ones():
    sync, store = stores()
    soon = now_ms() - 1  # already due
    later = now_ms() + 60_000
    for mid, at in (("transactional.a", soon), ("transactional.b", later)):
        sync.enqueue_single(mid, "b@example.com", single(mid).payload(), send_at_ms=at)
    # A send_at already past is not "waiting": it is due at once and published by the caller.
    assert scheduled(sync) == {"transactional.b": later}
    sync.schedule("transactional.a", soon)  # index it anyway: the scheduler handles it
    sync.schedule("transactional.gone", soon)

    async def main() -> Any:
        next_in, members = await store.schedule_due(limit=10)
        state, entries, gone = await store.take_scheduled(TRANSACTIONAL, members)
        again = await store.take_scheduled(TRANSACTIONAL, members)
        return next_in, members, state, entries, gone, again

    next_in, members, state, entries, gone, again = asyncio.run(main())
    assert sorted(members) == ["transactional.a", "transactional.gone"]
    assert 55 < next_in <= 60
    assert state is CampaignState.RUNNING
    assert [e.batch_id for e in entries] == []  # "a" was never waiting: due after the grace
    assert sorted(gone) == ["transactional.a", "transactional.gone"]
    assert again[1] == []


def test_a_due_scheduled_entry_is_taken_and_pushed_out_like_a_fresh_enqueue():
    sync, store = stores()
    mid = "transactional.d1"
    sync.enqueue_single(mid, "b@example.com", single(mid).payload(), send_at_ms=now_ms() + 150)
    time.sleep(0.2)

    async def main() -> Any:
        next_in, members = await store.schedule_due(limit=10)
        taken = await store.take_scheduled(TRANSACTIONAL, members)
        return next_in, members, taken, await store.take_scheduled(TRANSACTIONAL, members)

    next_in, members, (_, entries, gone), (_, twice, _) = asyncio.run(main())
    assert next_in is None and members == [mid] and gone == []
    assert [e.batch_id for e in entries] == [mid] and twice == []
    due = sync.redis.zscore(sync.keys.due(TRANSACTIONAL), mid)
    assert due > now_ms() + 3600_000  # the redeliver-after: a lost publish is swept then


def test_schedule_due_reports_zero_when_more_are_due_than_the_limit():
    sync, store = stores()
    for i in range(3):
        sync.schedule(f"transactional.m{i}", 1)
    next_in, members = asyncio.run(store.schedule_due(limit=2))
    assert next_in == 0 and len(members) == 2


# Scheduled campaigns ------------------------------------------------------------------------


def stored_campaign(sync: StatusStore, cid: str, batches: int, send_at_ms: int | None) -> None:
    sync.create_campaign(cid, template={"x": 1}, send_at_ms=send_at_ms)
    ttl = sync.ttl_for(send_at_ms)
    pipe = sync.redis.pipeline(transaction=True)
    sync.add_queued(cid, batches, pipe)
    for b in range(batches):
        entry = LedgerEntry(f"b{b}", {"items": [[b, f"r{b}@x.test", {}, 0]]})
        sync.store_batch(cid, entry, b, pipe, ttl_s=ttl)
    pipe.execute()
    sync.finish_enqueue(cid)


def dispatch(store: AsyncStatusStore, cid: str, take: int) -> Any:
    return asyncio.run(store.dispatch(cid, take, unclaimed_after_s=60))


def test_a_scheduled_campaign_hands_out_nothing_before_its_time():
    sync, store = stores()
    at = now_ms() + 300_000
    stored_campaign(sync, "later", 3, at)
    status = sync.campaign_status("later")
    assert status.send_at == at / 1000 and status.scheduled
    assert status.to_dict()["send_at"] == at / 1000 and status.to_dict()["scheduled"] is True
    assert scheduled(sync) == {START_PREFIX + "later": at}
    # Its record, template and stored batches are kept until then plus the retention.
    for key in (sync.keys.campaign("later"), sync.keys.template("later")):
        assert sync.redis.ttl(key) > 3600 + 290
    assert sync.redis.ttl(sync.keys.backlog("later")) > 3600 + 290
    waiting = dispatch(store, "later", 3)
    assert waiting.taken == [] and waiting.backlog == 3
    assert 290 < waiting.starts_in_s <= 300
    # Its time comes (the record's send_at is the truth): batches go out.
    sync.redis.hset(sync.keys.campaign("later"), "send_at", now_ms() - 1)
    assert not sync.campaign_status("later").scheduled
    started = dispatch(store, "later", 3)
    assert [e.batch_id for e in started.taken] == ["b0", "b1", "b2"]
    assert started.starts_in_s == 0


def test_pause_resume_and_cancel_work_on_a_scheduled_campaign():
    sync, store = stores()
    stored_campaign(sync, "p", 2, now_ms() + 300_000)
    assert sync.pause("p")
    assert sync.campaign_status("p").state is CampaignState.PAUSED
    assert sync.resume("p") == []  # nothing was parked
    assert sync.campaign_status("p").state is CampaignState.RUNNING
    assert dispatch(store, "p", 2).taken == []  # still waiting for its time
    # Cancel ends it now: its batches are taken at once, to be recorded cancelled.
    stored_campaign(sync, "c", 2, now_ms() + 300_000)
    sync.cancel("c")
    assert START_PREFIX + "c" not in scheduled(sync)
    status = sync.campaign_status("c")
    assert status.state is CampaignState.CANCELLED and not status.scheduled
    taken = dispatch(store, "c", 2)
    assert len(taken.taken) == 2 and taken.starts_in_s == 0


def test_a_scheduled_campaign_gets_no_slot_from_the_dispatcher_until_its_time():
    from tests.unit.test_dispatch import FakeRuntime, round_with

    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t")
    stored_campaign(sync, "later", 3, now_ms() + 300_000)
    stored_campaign(sync, "now", 1, None)
    rt = FakeRuntime(server)
    assert [(j.campaign_id, j.batch_id) for j in round_with(rt)] == [("now", "b0")]
    assert sync.backlog_size("later") == 3
    sync.redis.hset(sync.keys.campaign("later"), "send_at", now_ms() - 1)
    assert {j.campaign_id for j in round_with(rt)} == {"later"}


# Single messages in the bulk lane: what the store guarantees ------------------------------


def test_a_single_messages_row_is_never_kept_whatever_its_lane():
    sync, _ = stores()
    mid = "transactional.f1"
    job = single(mid, Priority.BULK)
    sync.enqueue_single(mid, "b@example.com", job.payload())
    row = job.items[0].to_json()  # what delivery keeps for a failed bulk message: its body
    sync.finish(TRANSACTIONAL, [Transition(mid, MessageState.FAILED, 554, "no", row=row)])
    record = sync.message_status(mid)
    assert record.state is MessageState.FAILED and record.row is None
    assert b"row" not in sync.redis.hkeys(sync.keys.message(mid))


def test_a_single_message_handed_back_unpublished_is_due_now_and_indexed():
    sync, store = stores()
    mid = "transactional.h1"
    job = single(mid, Priority.BULK)
    sync.enqueue_single(mid, "b@example.com", job.payload())
    entry = LedgerEntry(mid, job.payload(), stored=True)  # a worker stopping mid-batch

    async def main() -> None:
        await store.finish(TRANSACTIONAL, [], settle=Settlement(done_batch=mid, follow_ups=[entry]))

    asyncio.run(main())
    assert sync.backlog_size(TRANSACTIONAL) == 0  # nobody dispatches the standing campaign
    assert sync.redis.zscore(sync.keys.due(TRANSACTIONAL), mid) <= now_ms()
    assert scheduled(sync) == {mid: 0}


# The scheduler loop's step -----------------------------------------------------------------


class FakeRuntime:
    """What the scheduler uses of a worker process."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.settings = Settings(host="localhost", port=465, key_prefix="t")
        self.redis = fakeredis.FakeAsyncRedis(server=server)
        self.store = AsyncStatusStore(self.redis, key_prefix="t", retention_s=3600)
        self.token = "proc-1"
        self.stopping = False

    async def idle(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return self.stopping


def test_a_scheduler_step_publishes_due_messages_and_wakes_the_dispatcher():
    from ses_tasks.worker.scheduler import Scheduler

    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    rt = FakeRuntime(server)
    due_at = now_ms() + 100
    for mid, at, lane in (
        ("transactional.x1", due_at, Priority.BULK),
        ("transactional.x2", due_at, Priority.TRANSACTIONAL),
        ("transactional.x3", now_ms() + 60_000, Priority.TRANSACTIONAL),
    ):
        sync.enqueue_single(mid, "b@example.com", single(mid, lane, "eu").payload(), send_at_ms=at)
    stored_campaign(sync, "camp", 1, due_at)
    sync.redis.delete(sync.keys.dispatch_kick())
    published: list[BatchJob] = []
    scheduler = Scheduler(rt, published.append)  # type: ignore[arg-type]

    async def main() -> tuple[float | None, float | None]:
        first = await scheduler.run_due()  # nothing due yet
        await asyncio.sleep(0.15)
        return first, await scheduler.run_due()

    first, after = asyncio.run(main())
    assert first is not None and first <= 0.1
    assert sorted((j.batch_id, j.priority, j.profile) for j in published) == [
        ("transactional.x1", Priority.BULK, "eu"),
        ("transactional.x2", Priority.TRANSACTIONAL, "eu"),
    ]
    assert after is not None and 55 < after <= 60
    assert scheduled(sync) == {"transactional.x3": pytest.approx(now_ms() + 60_000, abs=2000)}
    assert sync.redis.llen(sync.keys.dispatch_kick()) == 1  # the campaign may start
    assert scheduler.published == 2 and scheduler.started_campaigns == 1


def test_a_failed_publish_is_left_due_now_for_the_sweeper():
    from ses_tasks.worker.scheduler import Scheduler

    server = fakeredis.FakeServer()
    sync = StatusStore(fakeredis.FakeRedis(server=server), key_prefix="t", retention_s=3600)
    rt = FakeRuntime(server)
    mid = "transactional.y1"
    sync.enqueue_single(mid, "b@example.com", single(mid).payload(), send_at_ms=now_ms() + 50)
    time.sleep(0.1)

    def broken(job: BatchJob) -> None:
        raise ConnectionError("broker down")

    scheduler = Scheduler(rt, broken)  # type: ignore[arg-type]
    asyncio.run(scheduler.run_due())
    assert sync.redis.zscore(sync.keys.due(TRANSACTIONAL), mid) == 0
    assert scheduled(sync) == {} and scheduler.published == 0


# The client: what it publishes now, and what it leaves to the scheduler ------------------


class StubCelery:
    backend = None  # results are not read here

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append((name, kwargs))


def fake_client() -> tuple[SesTasks, StubCelery]:
    app = StubCelery()
    ses = SesTasks(Settings(host="localhost", port=465, key_prefix="t"), celery_app=app)  # type: ignore[arg-type]
    ses.__dict__["redis"] = fakeredis.FakeRedis()  # the cached client, on fakeredis
    return ses, app


def test_a_scheduled_send_publishes_nothing_and_its_key_sends_it_once():
    from ses_tasks.produce.client import StoredMessageResult

    ses, app = fake_client()
    at = datetime.now(UTC) + timedelta(minutes=10)
    first = ses.send_email(**MESSAGE, send_at=at, idempotency_key="k1", profile="")
    second = ses.send_email(**MESSAGE, send_at=at.isoformat(), idempotency_key="k1")
    third = ses.send_email(**MESSAGE, idempotency_key="k1")  # no send_at: still waits
    assert first.message_id == second.message_id == third.message_id
    assert app.sent == []
    assert scheduled(ses.store) == {first.message_id: int(at.timestamp() * 1000)}
    record = ses.message_status(first.message_id)
    assert record.state is MessageState.QUEUED
    assert record.send_at == int(at.timestamp() * 1000) / 1000
    assert ses.store.campaign_status(TRANSACTIONAL).total == 1
    assert not isinstance(first, StoredMessageResult)


def test_priority_picks_the_queue_and_the_result_reader():
    from ses_tasks.produce.client import StoredMessageResult
    from ses_tasks.queue.app import BATCH_TASK, MESSAGE_TASK

    ses, app = fake_client()
    tx = ses.send_email(**MESSAGE)
    bulk = ses.send_email(**MESSAGE, priority="bulk")
    (tx_name, tx_kwargs), (bulk_name, bulk_kwargs) = app.sent
    assert (tx_name, tx_kwargs["queue"], tx_kwargs["task_id"]) == (
        MESSAGE_TASK,
        "ses.tls.transactional",
        tx.message_id,
    )
    assert (bulk_name, bulk_kwargs["queue"]) == (BATCH_TASK, "ses.tls")
    campaign_id, _items, batch_id = bulk_kwargs["args"][:3]
    assert (campaign_id, batch_id) == (TRANSACTIONAL, bulk.message_id)
    assert isinstance(bulk, StoredMessageResult) and not bulk.ready()
    # Its result is read from the store: final once the worker records it.
    ses.store.finish(
        TRANSACTIONAL, [Transition(bulk.message_id, MessageState.SENT, 250, "Ok", "ses-1")]
    )
    assert bulk.ready()
    assert bulk.get(timeout=1) == {
        "message_id": bulk.message_id,
        "state": "sent",
        "ses_message_id": "ses-1",
        "code": 250,
        "reason": "Ok",
    }
