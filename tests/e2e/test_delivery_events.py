"""Delivery events from real worker processes: every worker event type reaches a Python hook
once, with the message's metadata; a failing hook is counted and delivery still completes;
metadata is never in the mail the recipient gets; an unknown hook stops the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ses_tasks.sandbox.embedded import WorkerProcess, free_port, wait_for

from ..event_hooks import EVENTS_FILE_ENV, read_events

ROOT = Path(__file__).resolve().parents[2]


def hook_env(events_file: Path, hooks: str = "tests.event_hooks.record") -> dict[str, str]:
    return {
        "SES_TASKS_EVENT_HOOKS": hooks,
        EVENTS_FILE_ENV: str(events_file),
        "PYTHONPATH": str(ROOT),
    }


def wait_events(path: Path, n: int, *, timeout_s: float = 30) -> list[dict[str, Any]]:
    return wait_for(
        lambda: events if len(events := read_events(path)) >= n else None,
        timeout_s=timeout_s,
        what=f"{n} events in {path.name}",
    )


def by_message(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        out.setdefault(event["message_id"], []).append(event)
    return out


def test_sent_failed_and_suppressed_reach_the_hook_once_with_metadata(
    make_pipeline, tmp_path: Path
):
    events_file = tmp_path / "events.jsonl"
    pipeline = make_pipeline(
        "tls", sandbox_args=["--reject-recipient", "refused@example.com"], **hook_env(events_file)
    )
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    client.suppress(["blocked@example.com"])

    recipients = [f"ok{i}@example.com" for i in range(8)]
    recipients += ["refused@example.com", "blocked@example.com"]
    campaign_meta = {"newsletter_id": 7, "tags": ["spring", "sale"], "ratio": 0.5, "x": None}
    status = client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello",
        recipients=recipients,
        campaign_id="events-campaign",
        metadata=campaign_meta,
    )
    single = client.send_email(
        from_="app@example.com",
        to=["reset@example.com"],
        subject="Reset",
        text="Your code: 1",
        metadata={"user_id": 42, "kind": "password-reset"},
    )
    single_blocked = client.send_email(
        from_="app@example.com",
        to=["blocked@example.com"],
        subject="Reset",
        text="Your code: 2",
        metadata={"user_id": 43},
    )
    final = pipeline.wait_done(status.id)
    assert (final.counts["sent"], final.counts["failed"], final.counts["suppressed"]) == (8, 1, 1)
    assert single.get(timeout=60)["state"] == "sent"
    assert single_blocked.get(timeout=60)["state"] == "suppressed"

    events = wait_events(events_file, 12)
    time.sleep(1.0)  # a second copy of any event would show up late
    assert len(read_events(events_file)) == 12
    grouped = by_message(events)
    assert all(len(v) == 1 for v in grouped.values()), grouped
    campaign_events = [e for e in events if e["campaign_id"] == "events-campaign"]
    assert Counter(e["type"] for e in campaign_events) == {"sent": 8, "failed": 1, "suppressed": 1}
    for event in campaign_events:
        assert event["metadata"] == campaign_meta
        assert set(event) == {
            "type",
            "message_id",
            "campaign_id",
            "recipient",
            "ses_message_id",
            "metadata",
            "details",
            "at",
        }
    types = {e["recipient"]: e["type"] for e in campaign_events}
    assert types["refused@example.com"] == "failed"
    assert types["blocked@example.com"] == "suppressed"
    failed = next(e for e in campaign_events if e["type"] == "failed")
    assert failed["details"]["code"] == 554 and "not verified" in failed["details"]["reason"]
    accepted = pipeline.accepted(at_least=9)
    ses_ids = {m["ses_message_id"] for m in accepted}
    for event in campaign_events:
        if event["type"] == "sent":
            assert event["ses_message_id"] in ses_ids
            record = client.message_status(event["message_id"])
            assert record is not None and record.ses_message_id == event["ses_message_id"]

    (sent_single,) = grouped[single.message_id]
    assert sent_single["type"] == "sent" and sent_single["campaign_id"] == "transactional"
    assert sent_single["metadata"] == {"user_id": 42, "kind": "password-reset"}
    assert sent_single["recipient"] == "reset@example.com"
    (blocked_single,) = grouped[single_blocked.message_id]
    assert blocked_single["type"] == "suppressed" and blocked_single["metadata"] == {"user_id": 43}

    # The status store keeps the metadata; the recipients' mail never carries it.
    assert client.message_status(single.message_id).metadata == {
        "user_id": 42,
        "kind": "password-reset",
    }
    assert client.message_status("events-campaign.0").metadata == campaign_meta
    for message in accepted:
        data = message["data"]
        assert "Subject: " in data
        for needle in ("password-reset", "newsletter_id", "user_id", "metadata", "spring"):
            assert needle not in data, (needle, data[:2000])


def test_unknown_outcome_reaches_the_hook(make_pipeline, tmp_path: Path):
    events_file = tmp_path / "events.jsonl"
    pipeline = make_pipeline(
        "starttls", sandbox_args=["--drop-after-data-rate", "1.0"], **hook_env(events_file)
    )
    pipeline.start_worker(concurrency=1, queues="transactional")
    result = pipeline.client.send_email(
        from_="app@example.com",
        to=["maybe@example.com"],
        subject="Receipt",
        text="Thanks",
        metadata={"order": "A-1"},
    )
    assert result.get(timeout=60)["state"] == "unknown"
    (event,) = wait_events(events_file, 1)
    assert event["type"] == "unknown" and event["message_id"] == result.message_id
    assert event["metadata"] == {"order": "A-1"} and event["recipient"] == "maybe@example.com"
    assert event["ses_message_id"] is None and event["details"]["reason"]
    assert len(read_events(events_file)) == 1


def test_failing_hook_is_counted_and_delivery_completes(make_pipeline, tmp_path: Path):
    pytest.importorskip("prometheus_client")
    from .test_metrics import scrape, total

    events_file = tmp_path / "events.jsonl"
    pipeline = make_pipeline(
        "tls", **hook_env(events_file, "tests.event_hooks.explode, tests.event_hooks.record")
    )
    port = free_port()
    worker = WorkerProcess(
        env=pipeline.env,
        mode="tls",
        concurrency=2,
        log_path=tmp_path / "worker-events.log",
        extra_args=["--metrics-port", str(port)],
    ).start()
    pipeline.workers.append(worker)
    status = pipeline.client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello",
        recipients=[f"u{i}@example.com" for i in range(20)],
        campaign_id="events-failing-hook",
        metadata={"n": 1},
    )
    final = pipeline.wait_done(status.id)
    assert final.counts["sent"] == 20
    # The failing hook does not keep the next one from its events.
    events = wait_events(events_file, 20)
    assert {e["type"] for e in events} == {"sent"} and len(events) == 20

    def counted() -> float | None:
        samples = scrape(port)
        if samples is None:
            return None
        n = total(
            samples,
            "ses_tasks_event_hook_failures_total",
            hook="tests.event_hooks.explode",
        )
        return n if n >= 20 else None

    assert wait_for(counted, timeout_s=30, what="hook failures counted") == 20
    assert "this hook fails on purpose" in pipeline.worker_logs()


@pytest.mark.parametrize("hooks", ["tests.event_hooks.missing", "no_such_module_xyz.hook"])
def test_unknown_hook_stops_the_worker_at_start(make_pipeline, tmp_path: Path, hooks: str):
    pipeline = make_pipeline("tls", **hook_env(tmp_path / "events.jsonl", hooks))
    done = subprocess.run(
        [sys.executable, "-m", "ses_tasks.ops.cli", "worker", "--mode", "tls"],
        env={**os.environ, **pipeline.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SES_TASKS_EVENT_HOOKS" in done.stderr and hooks in done.stderr


def test_events_are_published_to_the_applications_celery_task(
    make_pipeline, tmp_path: Path, redis_client
):
    import uuid

    from ..conftest import REDIS_URL
    from ..event_task_app import TASK_NAME

    events_file = tmp_path / "events.jsonl"
    queue = f"app-events-{uuid.uuid4().hex[:8]}"
    pipeline = make_pipeline(
        "tls",
        **hook_env(events_file, hooks=""),
        SES_TASKS_EVENT_TASK=TASK_NAME,
        SES_TASKS_EVENT_TASK_QUEUE=queue,
        SES_TASKS_EVENT_BROKER_URL=REDIS_URL,
    )
    pipeline.start_worker(concurrency=1, queues="transactional")
    app_worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.event_task_app",
            "worker",
            "--pool",
            "solo",
            "--queues",
            queue,
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ],
        env={
            **os.environ,
            **hook_env(events_file),
            "EVENT_APP_BROKER": REDIS_URL,
            "EVENT_APP_QUEUE": queue,
        },
        cwd=ROOT,
        stdout=(tmp_path / "app-worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        result = pipeline.client.send_email(
            from_="app@example.com",
            to=["task@example.com"],
            subject="Hi",
            text="Hello",
            metadata={"user_id": 7},
        )
        assert result.get(timeout=60)["state"] == "sent"
        (event,) = wait_events(events_file, 1, timeout_s=60)
        assert event["handled_by"] == "celery"
        assert (event["type"], event["message_id"]) == ("sent", result.message_id)
        assert event["metadata"] == {"user_id": 7}
    finally:
        app_worker.terminate()
        app_worker.wait(timeout=20)
        for key in redis_client.scan_iter(match=f"*{queue}*"):
            redis_client.delete(key)


def test_django_receivers_get_worker_events(make_pipeline, tmp_path: Path):
    """The documented Django set-up: the worker sets Django up (DJANGO_SETTINGS_MODULE)
    before importing send_signals, so receivers connected in AppConfig.ready() run."""
    pytest.importorskip("django")
    events_file = tmp_path / "events.jsonl"
    pipeline = make_pipeline(
        "tls",
        **hook_env(events_file, hooks="ses_tasks.integrations.django.send_signals"),
        DJANGO_SETTINGS_MODULE="tests.django_events.settings",
    )
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    client.suppress(["gone@example.com"])
    status = client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello",
        recipients=["a@example.com", "gone@example.com"],
        campaign_id="django-events",
        metadata={"newsletter": 3},
    )
    pipeline.wait_done(status.id)
    events = wait_events(events_file, 2)
    assert sorted((e["type"], e["recipient"]) for e in events) == [
        ("sent", "a@example.com"),
        ("suppressed", "gone@example.com"),
    ]
    assert all(e["via"] == "django-signal" and e["metadata"] == {"newsletter": 3} for e in events)
