"""The streaming dispatcher under faults: every recipient once, counters add up.

The dispatcher runs in one worker process at a time; producers only store batches. These
kill the dispatcher's process and the producer with SIGKILL, lose a taken batch between
take and publish, and watch that the broker never holds more than the window.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.store.tracking import AsyncStatusStore

from .support import adds_up, delivered, records, seq_of

TEMPLATE = dict(from_="news@example.com", subject="Hi", text="Hello {{ email }}")


def _recipients(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def _sent(client: Any, campaign_id: str) -> int:
    return int(client.campaign_status(campaign_id).counts["sent"])


def _every_recipient_once(pipeline: Any, campaign_id: str, prefix: str, total: int) -> None:
    """Each recipient reached the endpoint; a second copy only for a send lost track of."""
    final = pipeline.wait_done(campaign_id, timeout_s=180)
    assert final.counts["sent"] == total and adds_up(final), final.to_dict()
    counts = delivered(pipeline.accepted(at_least=total))
    assert set(counts) == set(_recipients(prefix, total))
    by_seq = records(pipeline.client, campaign_id, total)
    for email, n in counts.items():
        if n > 1:
            record = by_seq[seq_of(email)]
            assert record is not None and record.recovered, (email, n, record)


def _dispatcher_pid(client: Any) -> int | None:
    token = client.redis.get(client.store.keys.dispatcher_lock())
    return int(token.decode().split("-")[0]) if token else None


def test_kill_9_of_the_dispatching_process_mid_campaign(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="300", SES_TASKS_CLAIM_LEASE_S="3")
    first = pipeline.start_worker(concurrency=2)
    second = pipeline.start_worker(concurrency=2)
    client = pipeline.client
    total = 2000
    client.send_campaign(recipients=_recipients("d", total), campaign_id="dkill", **TEMPLATE)
    killed = []
    for _ in range(2):  # twice: the second kill lands on the process that took over
        sent_before = _sent(client, "dkill")
        wait_for(lambda b=sent_before: _sent(client, "dkill") >= b + 300, timeout_s=60)
        pid = wait_for(lambda: _dispatcher_pid(client), timeout_s=10, what="a dispatcher")
        assert pid in first.child_pids() + second.child_pids()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_for(
            lambda p=pid: _dispatcher_pid(client) not in (None, p),
            timeout_s=15,
            what="another process to take over dispatching",
        )
    assert client.campaign_status("dkill").open > 0 or len(killed) == 2
    _every_recipient_once(pipeline, "dkill", "d", total)


def test_a_batch_taken_but_never_published_is_swept(make_pipeline):
    """The dispatcher died between take and publish: the ledger still has the batch."""
    pipeline = make_pipeline(
        "starttls", SES_TASKS_DISPATCH_TIMEOUT_S="2", SES_TASKS_SWEEP_INTERVAL_S="0.5"
    )
    client = pipeline.client
    total = 300
    client.send_campaign(recipients=_recipients("t", total), campaign_id="taken", **TEMPLATE)

    async def take_and_die() -> int:
        r = aioredis.Redis.from_url(pipeline.env["SES_TASKS_REDIS_URL"])
        store = AsyncStatusStore(r, key_prefix=pipeline.env["SES_TASKS_KEY_PREFIX"])
        reply = await store.dispatch("taken", 2, unclaimed_after_s=2)
        await r.aclose()
        return len(reply.taken)

    assert asyncio.run(take_and_die()) == 2  # two batches taken, never published
    pipeline.start_worker(concurrency=2)
    _every_recipient_once(pipeline, "taken", "t", total)
    assert client.campaign_status("taken").swept >= 2


def test_kill_9_of_the_producer_then_resume(make_pipeline, tmp_path: Path):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="500")
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    total = 20000
    csv = tmp_path / "recipients.csv"
    csv.write_text("email\n" + "\n".join(_recipients("p", total)) + "\n")
    env = {**os.environ, **pipeline.env}
    command = [
        sys.executable,
        "-m",
        "ses_tasks.ops.cli",
        "campaign",
        "send",
        "--from",
        "news@example.com",
        "--subject",
        "Hi",
        "--recipients",
        str(csv),
        "--id",
        "pkill",
    ]
    text = tmp_path / "body.txt"
    text.write_text("Hello {{ email }}")
    command += ["--text", str(text)]
    producer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stored_part() -> int | None:
        try:
            upto = client.store.enqueued_upto("pkill")
        except Exception:
            return None
        return upto if 0 < upto < total else None

    wait_for(stored_part, timeout_s=60, interval_s=0.01, what="the producer mid-way")
    producer.kill()
    producer.wait(timeout=10)
    assert not client.campaign_status("pkill").enqueued_all, "the kill must land mid-enqueue"
    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    _every_recipient_once(pipeline, "pkill", "p", total)


def test_the_broker_holds_no_more_than_the_window(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_MAX_SEND_RATE="400", SES_TASKS_BATCH_SIZE="20")
    client = pipeline.client
    total = 4000
    client.send_campaign(recipients=_recipients("w", total), campaign_id="bounded", **TEMPLATE)
    broker = client.redis
    prefix = pipeline.env["SES_TASKS_KEY_PREFIX"] + ":broker:"

    def broker_tasks() -> int:
        held = 0
        for key in broker.scan_iter(match=prefix + "*"):
            kind = broker.type(key)
            if kind == b"list":
                held += broker.llen(key)
        held += broker.hlen(prefix + "unacked")
        return held

    assert broker_tasks() == 0  # stored: 200 batches, none on the broker yet
    pipeline.start_worker(concurrency=2)  # 2 processes x 2 batches: a window of 4
    peak = 0

    def done_while_watching() -> bool:
        nonlocal peak
        peak = max(peak, broker_tasks())
        return client.campaign_status("bounded").done

    wait_for(done_while_watching, timeout_s=120, interval_s=0.05, what="the campaign")
    print(f"broker peak {peak} tasks for 200 batches")
    assert 1 <= peak <= 4
    assert set(delivered(pipeline.accepted(at_least=total))) == set(_recipients("w", total))
