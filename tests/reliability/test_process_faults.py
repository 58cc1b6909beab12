"""Processes dying under a running campaign: Redis, the SMTP endpoint, the worker's main process.

Existing end-to-end tests already cover kill -9 of the prefork children and SIGTERM with
QUIT (tests/e2e/test_worker_faults.py); these add what they do not.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import redis

from ses_tasks.errors import CampaignError
from ses_tasks.sandbox.embedded import SandboxProcess, wait_for

from .support import PrivateRedis, adds_up, delivered, records, seq_of


def _campaign(pipeline: Any, campaign_id: str, total: int, prefix: str) -> None:
    pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello {{ email }}",
        recipients=[f"{prefix}{i}@example.com" for i in range(total)],
        campaign_id=campaign_id,
    )


def _sent(client: Any, campaign_id: str) -> int:
    try:
        return int(client.campaign_status(campaign_id).counts["sent"])
    except (redis.ConnectionError, CampaignError):
        return 0


def _assert_duplicates_are_recovered(pipeline: Any, campaign_id: str, total: int) -> None:
    """A recipient gets two copies only if a worker lost track of a send it had started."""
    by_seq = records(pipeline.client, campaign_id, total)
    counts = delivered(pipeline.sandbox.accepted())
    for email, n in counts.items():
        if n > 1:
            record = by_seq[seq_of(email)]
            assert record is not None and record.recovered, (email, n, record)


# Redis --------------------------------------------------------------------------------------


def test_redis_with_aof_killed_and_restarted_mid_campaign_completes(make_pipeline, tmp_path: Path):
    """AOF with fsync on every write: a crash loses nothing acknowledged; the campaign ends."""
    server = PrivateRedis(tmp_path / "redis-aof", appendonly=True).start()
    try:
        pipeline = make_pipeline(
            "tls",
            SES_TASKS_REDIS_URL=server.url,
            SES_TASKS_BROKER_URL=server.url,
            SES_TASKS_MAX_SEND_RATE="300",
        )
        pipeline.start_worker(concurrency=2)
        total = 1500
        _campaign(pipeline, "redis-aof", total, "a")
        client = pipeline.client
        wait_for(lambda: _sent(client, "redis-aof") >= 200, timeout_s=60, what="sends")
        server.kill()
        down = redis.Redis.from_url(server.url)
        wait_for(lambda: _refused(down), timeout_s=5, what="Redis down")
        sent_before = len(pipeline.sandbox.accepted())
        server.start()
        # Before the fix in app.py (result_backend_always_retry) about 1 run in 5 lost a
        # batch here: storing the task state failed while Redis was down, Celery failed
        # the task and acknowledged it, and its 50 messages stayed queued for ever.
        final = pipeline.wait_done("redis-aof", timeout_s=120)
        assert final.counts["sent"] == total and adds_up(final), final.to_dict()
        pipeline.sandbox.stop()
        counts = delivered(pipeline.sandbox.accepted())
        assert set(counts) == {f"a{i}@example.com" for i in range(total)}
        assert sent_before < total
        _assert_duplicates_are_recovered(pipeline, "redis-aof", total)
    finally:
        server.stop()


def test_redis_without_persistence_loses_the_queue_and_the_records(make_pipeline, tmp_path: Path):
    """No AOF, no RDB: a restart comes back empty. This is what is lost, shown as it is.

    Lost: every batch still waiting in the broker queue (those recipients are never sent),
    the campaign record and its counters, the template, every message record. Kept: what
    SES already accepted (it is out). Batches a worker held at the time are retried and
    sent against the empty store (see the xfail test below for what that does).
    """
    server = PrivateRedis(tmp_path / "redis-mem", appendonly=False).start()
    try:
        pipeline = make_pipeline(
            "tls",
            SES_TASKS_REDIS_URL=server.url,
            SES_TASKS_BROKER_URL=server.url,
            SES_TASKS_MAX_SEND_RATE="300",
        )
        worker = pipeline.start_worker(concurrency=2)
        total = 1500
        _campaign(pipeline, "redis-mem", total, "m")
        client = pipeline.client
        wait_for(lambda: _sent(client, "redis-mem") >= 200, timeout_s=60, what="sends")
        server.kill()
        server.start()
        fresh = redis.Redis.from_url(server.url)
        assert fresh.get(client.store.keys.template("redis-mem")) is None
        # A warm shutdown lets the worker finish what it holds; then nothing moves any more.
        assert worker.stop(timeout_s=60) == 0
        pipeline.sandbox.stop()
        counts = delivered(pipeline.sandbox.accepted())
        assert 200 <= len(counts) < total, len(counts)
        # The campaign record went with Redis: it is missing, or (see the xfail below) a
        # husk rebuilt by in-flight batches, without its total.
        assert not _exists(client) or client.campaign_status("redis-mem").total == 0
    finally:
        server.stop()


def _exists(client: Any) -> bool:
    try:
        client.campaign_status("redis-mem")
    except CampaignError:
        return False
    return True


def test_claim_for_a_campaign_lost_with_redis_sends_nothing(redis_client, key_prefix):
    from ses_tasks.store.tracking import StatusStore

    store = StatusStore(redis_client, key_prefix=key_prefix)
    reply = store.claim(
        "vanished",
        [("vanished.0", "a@example.com", False), ("vanished.1", "b@example.com", False)],
        lease_s=5,
        token="t",
    )
    assert reply.campaign_state is None
    assert [c.decision for c in reply.claims] == ["skip:missing", "skip:missing"]
    assert not redis_client.exists(store.keys.campaign("vanished"))
    assert not redis_client.exists(store.keys.message("vanished.0"))


def test_single_message_whose_records_were_lost_is_counted_again(redis_client, key_prefix):
    from ses_tasks.store.tracking import StatusStore

    store = StatusStore(redis_client, key_prefix=key_prefix)
    (claim,) = store.claim(
        "transactional", [("transactional.abc", "a@example.com", False)], lease_s=5, token="t"
    ).claims
    assert claim.go
    status = store.campaign_status("transactional")
    assert status.total == 1 and status.counts["sending"] == 1
    assert sum(status.counts.values()) == status.total


def _refused(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.ConnectionError:
        return True
    return False


# The SMTP endpoint -------------------------------------------------------------------------


def test_endpoint_down_for_a_while_messages_retry_then_all_sent(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline(
        "starttls",
        SES_TASKS_MAX_SEND_RATE="300",
        # Down for a few seconds at 0.2-2 s backoff: give the retry budget room.
        SES_TASKS_MAX_ATTEMPTS="30",
    )
    pipeline.start_worker(concurrency=2)
    total = 1200
    _campaign(pipeline, "smtp-down", total, "d")
    client = pipeline.client
    wait_for(lambda: _sent(client, "smtp-down") >= 150, timeout_s=60, what="sends")
    old = pipeline.sandbox
    old.stop()

    def waiting() -> Any:
        s = client.campaign_status("smtp-down")
        return s if s.counts["retrying"] + s.counts["deferred"] > 0 else None

    during = wait_for(waiting, timeout_s=30, what="messages retrying while the endpoint is down")
    assert during.counts["failed"] == 0
    stuck = client.campaign_status("smtp-down").counts["sent"]
    # Same ports, same CA, same store file: the endpoint comes back where it was.
    pipeline.sandbox = SandboxProcess(
        old.workdir,
        password=old.password,
        starttls_port=old.starttls_port,
        tls_port=old.tls_port,
        store_path=old.store_path,
        events_path=old.events_path,
    ).start()
    final = pipeline.wait_done("smtp-down", timeout_s=120)
    # Stopping the endpoint cuts the sessions in flight: a message whose data had gone out
    # is recorded unknown (not resent by default); everything else ends sent.
    assert final.counts["failed"] == 0, final.to_dict()
    assert final.counts["sent"] + final.counts["unknown"] == total, final.to_dict()
    assert final.counts["unknown"] <= 8, final.to_dict()  # at most one per open connection
    assert adds_up(final) and stuck < total
    pipeline.sandbox.stop()
    counts = delivered(pipeline.sandbox.accepted())
    assert len(counts) >= final.counts["sent"] and max(counts.values()) == 1
    retried = [r for r in records(client, "smtp-down", total).values() if r and r.attempts > 1]
    assert retried, "some messages must have been tried while the endpoint was down"


# The worker's main process ------------------------------------------------------------------


def test_kill_9_of_the_worker_main_process_broker_redelivers(make_pipeline):
    """The main process holds the broker connection and the unacknowledged tasks."""
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_MAX_SEND_RATE="300",
        # The broker hands unacknowledged tasks to another worker after this long.
        SES_TASKS_VISIBILITY_TIMEOUT_S="4",
        SES_TASKS_CLAIM_LEASE_S="2",
    )
    first = pipeline.start_worker(concurrency=2)
    total = 1500
    _campaign(pipeline, "kill-main", total, "k")
    client = pipeline.client
    wait_for(lambda: _sent(client, "kill-main") >= 300, timeout_s=60, what="sends")
    unacked = f"{pipeline.env['SES_TASKS_KEY_PREFIX']}:broker:unacked_index"
    broker = client.redis

    main = first.main_pid()
    assert main is not None

    def frozen_holding_tasks() -> bool:
        """The streaming dispatcher keeps only a few tasks in flight, so there are moments
        when the worker holds none: freeze Celery's main process (it acknowledges tasks),
        and kill it only while it holds some, or the test would prove nothing."""
        os.kill(main, signal.SIGSTOP)
        if broker.zcard(unacked) > 0:
            return True
        os.kill(main, signal.SIGCONT)
        return False

    wait_for(frozen_holding_tasks, timeout_s=30, what="the worker holding unacknowledged tasks")
    children = first.child_pids()
    os.kill(first.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(main, signal.SIGKILL)  # frozen: it could not have acknowledged anything since
    # Orphaned pool processes have no parent left to report to; a crashed host or
    # container takes them too.
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not first.alive(), timeout_s=10, what="the main process gone")
    halted = client.campaign_status("kill-main")
    assert halted.open > 0, "the kill must land mid-campaign"
    # The dead worker's tasks sit in the broker's unacknowledged set. A worker restores
    # those older than the visibility timeout when it starts (and then only every
    # ~100 s, kombu's sweep), so start the new one once they are that old.
    held = broker.zrange(unacked, 0, -1, withscores=True)
    assert held, "the dead worker held tasks it never acknowledged"
    newest = max(score for _, score in held)
    wait_for(
        lambda: broker.time()[0] > newest + 4.5,
        timeout_s=15,
        what="the visibility timeout to pass",
    )
    pipeline.start_worker(concurrency=2)
    final = pipeline.wait_done("kill-main", timeout_s=120)
    assert final.counts["sent"] == total and adds_up(final), final.to_dict()
    pipeline.sandbox.stop()
    counts = delivered(pipeline.sandbox.accepted())
    assert set(counts) == {f"k{i}@example.com" for i in range(total)}
    _assert_duplicates_are_recovered(pipeline, "kill-main", total)
