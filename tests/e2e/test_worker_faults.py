"""Workers under stress: warm connections across tasks, kill -9 mid-campaign, SIGTERM."""

from __future__ import annotations

import os
import signal
from collections import Counter

from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import COUNTERS


def _connects(pipeline) -> int:
    return sum(1 for e in pipeline.sandbox.events() if e.get("event") == "connect")


def test_warm_connections_are_reused_across_tasks(make_pipeline):
    pipeline = make_pipeline("starttls", SES_TASKS_MAX_MESSAGES_PER_CONNECTION="200")
    pipeline.start_worker(concurrency=2)
    status = pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello {{ email }}",
        recipients=[f"warm{i}@example.com" for i in range(1000)],
        campaign_id="warm",
    )
    final = pipeline.wait_done(status.id)
    assert final.counts["sent"] == 1000
    pipeline.accepted(at_least=1000)
    # 20 tasks of 50; 2 processes x 4 connections, each recycled after 200 messages.
    pool_total = 2 * 4
    recycles = 1000 // 200
    assert _connects(pipeline) <= pool_total + recycles
    sessions = Counter(m["session_id"] for m in pipeline.sandbox.accepted())
    assert max(sessions.values()) <= 200


def test_kill_9_of_a_worker_process_mid_campaign(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="300")
    worker = pipeline.start_worker(concurrency=2)
    total = 1500
    status = pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello {{ email }}",
        recipients=[f"k{i}@example.com" for i in range(total)],
        campaign_id="kill9",
    )
    client = pipeline.client
    wait_for(lambda: client.campaign_status("kill9").counts["sent"] >= 300, timeout_s=60)
    children = wait_for(worker.child_pids, timeout_s=10)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    final = pipeline.wait_done(status.id, timeout_s=120)
    assert sum(final.counts[n] for n in COUNTERS) == final.total == total
    assert final.counts["sent"] == total
    accepted = pipeline.accepted(at_least=total)
    delivered = Counter(r for m in accepted for r in m["rcpt_tos"])
    assert set(delivered) == {f"k{i}@example.com" for i in range(total)}
    duplicates = [email for email, n in delivered.items() if n > 1]
    for email in duplicates:
        seq = int(email[1:].split("@")[0])
        record = client.message_status(f"kill9.{seq}")
        # Only a message whose worker died mid-send may go twice, and it is marked.
        assert record.recovered, (email, record)


def test_sigterm_finishes_current_work_and_quits_connections(make_pipeline):
    pipeline = make_pipeline("starttls", SES_TASKS_MAX_SEND_RATE="200")
    worker = pipeline.start_worker(concurrency=2)
    pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="x",
        recipients=[f"t{i}@example.com" for i in range(600)],
        campaign_id="term",
    )
    client = pipeline.client
    wait_for(lambda: client.campaign_status("term").counts["sent"] >= 100, timeout_s=60)
    assert worker.stop(timeout_s=60) == 0
    status = client.campaign_status("term")
    assert status.counts["sending"] == 0

    def closed_sessions():
        events = pipeline.sandbox.events()
        opened = {e["session_id"] for e in events if e["event"] == "connect"}
        closed = {e["session_id"]: e["quit"] for e in events if e["event"] == "disconnect"}
        return closed if opened and opened == set(closed) else None

    closed = wait_for(closed_sessions, timeout_s=10, what="every connection closed")
    assert all(closed.values()), "a connection was closed without QUIT"
    pipeline.start_worker(concurrency=2)
    final = pipeline.wait_done("term")
    assert final.counts["sent"] == 600
