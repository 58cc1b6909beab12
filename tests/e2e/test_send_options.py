"""Per-call options through real workers and the sandbox: send_at (a single message across a
worker restart, a scheduled campaign, pause and cancel before its time) and priority=bulk
(the bulk queue and the limiter's bulk lane)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from ses_tasks.sandbox.embedded import WorkerProcess, free_port, wait_for
from ses_tasks.states import CampaignState, MessageState
from ses_tasks.store.tracking import COUNTERS

from ..conftest import REDIS_URL

MESSAGE = dict(from_="app@example.com", subject="Later", text="see you")
TEMPLATE = dict(from_="news@example.com", subject="Hi {{ email }}", text="x")


def _leading(pipeline, lock: str) -> bool:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return client.get(f"{pipeline.env['SES_TASKS_KEY_PREFIX']}:{lock}") is not None
    finally:
        client.close()


def _whole_second_ahead(seconds: int) -> int:
    return math.ceil(time.time()) + seconds


def test_a_scheduled_message_is_sent_on_time_after_a_worker_restart(make_pipeline):
    pipeline = make_pipeline("tls")
    first = pipeline.start_worker(concurrency=1)
    wait_for(lambda: _leading(pipeline, "scheduler"), timeout_s=30, what="a scheduler")
    client = pipeline.client
    send_at = _whole_second_ahead(10)  # a warm stop and a cold start fit well before
    result = client.send_email(
        **MESSAGE, to=["later@example.com"], send_at=datetime.fromtimestamp(send_at, tz=UTC)
    )
    record = client.message_status(result.message_id)
    assert record is not None and record.state is MessageState.QUEUED
    assert record.send_at == send_at

    first.stop(timeout_s=20)  # SIGTERM: a warm shutdown; it gives its locks up
    assert not first.alive()
    assert not _leading(pipeline, "scheduler")
    restarted_at = time.time()
    assert restarted_at < send_at - 2, "the first worker took too long to stop"
    assert pipeline.sandbox.accepted() == []
    pipeline.start_worker(concurrency=1)
    wait_for(lambda: _leading(pipeline, "scheduler"), timeout_s=30, what="a new scheduler")
    leading_at = time.time()

    accepted = pipeline.accepted(at_least=1, timeout_s=send_at - time.time() + 15)
    (message,) = accepted
    assert message["rcpt_tos"] == ["later@example.com"]
    late_s = message["received_at"] - send_at
    timing = (
        f"worker restarted {send_at - restarted_at:.1f} s before send_at, its scheduler led "
        f"{send_at - leading_at:.1f} s before; sent {late_s:.3f} s after send_at"
    )
    print(timing)
    if not 0 <= late_s <= 1.0:
        print(pipeline.worker_logs()[-6000:])
    assert leading_at < send_at, f"the new worker was not up before send_at: {timing}"
    assert 0 <= late_s <= 1.0, timing
    final = result.get(timeout=15)
    assert final["state"] == "sent" and final["ses_message_id"]
    assert client.message_status(result.message_id).send_at == send_at
    # Published by the new worker's scheduler, not swept late by the backstop.
    assert client.campaign_status("transactional").swept == 0


def test_a_scheduled_campaign_starts_at_its_time_and_completes(make_pipeline):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=2)
    wait_for(lambda: _leading(pipeline, "dispatcher"), timeout_s=30, what="a dispatcher")
    client = pipeline.client
    send_at = _whole_second_ahead(5)
    recipients = [f"s{i}@example.com" for i in range(120)]  # three batches of 50
    iso = datetime.fromtimestamp(send_at, tz=UTC).isoformat()
    status = client.send_campaign(
        recipients=recipients, campaign_id="scheduled", send_at=iso, **TEMPLATE
    )
    assert status.send_at == send_at and status.scheduled
    waiting = client.campaign_status("scheduled").to_dict()
    assert waiting["scheduled"] is True and waiting["send_at"] == send_at
    assert waiting["queued"] == waiting["total"] == 120

    final = pipeline.wait_done("scheduled", timeout_s=60)
    assert final.state is CampaignState.COMPLETED and final.counts["sent"] == 120
    assert sum(final.counts[n] for n in COUNTERS) == final.total
    assert not final.scheduled and final.to_dict()["send_at"] == send_at
    accepted = pipeline.accepted(at_least=120)
    times = sorted(m["received_at"] for m in accepted)
    print(f"first send {times[0] - send_at:.3f} s after send_at, last {times[-1] - send_at:.3f} s")
    assert send_at <= times[0] <= send_at + 1.0
    assert sorted(r for m in accepted for r in m["rcpt_tos"]) == sorted(recipients)


def test_a_scheduled_campaign_can_be_paused_resumed_and_cancelled_before_its_time(
    make_pipeline,
):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    later = datetime.fromtimestamp(_whole_second_ahead(3600), tz=UTC)
    recipients = [f"p{i}@example.com" for i in range(60)]
    client.send_campaign(recipients=recipients, campaign_id="held", send_at=later, **TEMPLATE)
    assert client.pause("held")
    assert client.campaign_status("held").state is CampaignState.PAUSED
    assert client.resume("held") == 0
    resumed = client.campaign_status("held")
    assert resumed.state is CampaignState.RUNNING and resumed.scheduled
    assert client.cancel("held") == 0

    final = pipeline.wait_done("held", timeout_s=30)  # ended now, not in an hour
    assert final.state is CampaignState.CANCELLED and not final.scheduled
    assert final.counts["cancelled"] == 60 and final.counts["sent"] == 0
    assert pipeline.sandbox.accepted() == []


def _scrape(port: int) -> dict | None:
    from .test_metrics import scrape

    return scrape(port)


def _total(samples: dict, name: str, **labels: str) -> float:
    from .test_metrics import total

    return total(samples, name, **labels)


def test_priority_bulk_travels_in_the_bulk_lane(make_pipeline, tmp_path: Path):
    pytest.importorskip("prometheus_client")
    pipeline = make_pipeline("tls")
    port = free_port()
    # A worker of the bulk queue only: it never sees the transactional queue.
    worker = WorkerProcess(
        env=pipeline.env,
        mode="tls",
        concurrency=1,
        queues="bulk",
        log_path=tmp_path / "worker-bulk.log",
        extra_args=["--metrics-port", str(port)],
    ).start()
    pipeline.workers.append(worker)
    wait_for(lambda: _scrape(port), timeout_s=30, what="the metrics endpoint")
    client = pipeline.client
    urgent = client.send_email(**MESSAGE, to=["urgent@example.com"])  # transactional
    newsletter = client.send_email(
        **MESSAGE, to=["digest@example.com"], priority="bulk", idempotency_key="digest-1"
    )

    record = newsletter.get(timeout=30)
    assert record["state"] == "sent" and record["ses_message_id"]
    # The same idempotency key again: nothing new is sent.
    again = client.send_email(
        **MESSAGE, to=["digest@example.com"], priority="bulk", idempotency_key="digest-1"
    )
    assert again.message_id == newsletter.message_id

    def counted() -> dict | None:
        samples = _scrape(port)
        if samples and _total(samples, "ses_tasks_messages_total", priority="bulk") >= 1:
            return samples
        return None

    samples = wait_for(counted, timeout_s=15, what="the bulk send in the metrics")
    assert _total(samples, "ses_tasks_messages_total", outcome="sent", priority="bulk") == 1
    assert _total(samples, "ses_tasks_limiter_wait_seconds_count", priority="bulk") == 1
    assert _total(samples, "ses_tasks_limiter_wait_seconds_count", priority="transactional") == 0
    # The transactional message waits for a worker of its queue; this one never took it.
    assert client.message_status(urgent.message_id).state is MessageState.QUEUED
    (sent,) = pipeline.accepted(at_least=1)
    assert sent["rcpt_tos"] == ["digest@example.com"]
    assert client.message_status(newsletter.message_id).email == "digest@example.com"
