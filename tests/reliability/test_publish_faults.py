"""Publishing that cannot lose a message: the broker refuses the producer's publish.

A single message is in the ledger before it is published, so the fleet's sweeper
publishes it; a caller retrying with the same idempotency key publishes it again while it
is still queued, and nothing twice. A campaign does not need the broker at all to be
stored: the dispatcher publishes its batches (its own publish failures are in the fault
matrix, site "follow-up publish", which matches every publish a worker makes).
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from ses_tasks.produce.client import SesTasks
from ses_tasks.queue.app import create_app
from ses_tasks.sandbox.embedded import free_port, wait_for

pytestmark = pytest.mark.slow


def _unreachable_broker_client(pipeline: Any) -> SesTasks:
    settings = pipeline.settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    app = create_app(settings)
    app.conf.task_publish_retry = False  # fail at once instead of after the retry policy
    app.conf.broker_connection_timeout = 1
    return SesTasks(settings, celery_app=app)


def _delivered(pipeline: Any, email: str, count: int) -> Counter[str]:
    def enough() -> Counter[str] | None:
        got = Counter(r for m in pipeline.sandbox.accepted() for r in m["rcpt_tos"])
        return got if got[email] >= count else None

    return wait_for(enough, timeout_s=30, what=f"{email} delivered")


def test_send_email_whose_publish_fails_is_published_by_the_sweeper(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_SWEEP_INTERVAL_S="0.5")
    pipeline.start_worker(concurrency=1)
    broken = _unreachable_broker_client(pipeline)
    result = broken.send_email(
        from_="app@example.com", to=["lost@example.com"], subject="Code", text="1234"
    )
    client = pipeline.client
    record = wait_for(
        lambda: (r := client.message_status(result.message_id)) and r.state.value == "sent" and r,
        timeout_s=30,
        what="the swept message to be sent",
    )
    assert record.ses_message_id
    assert _delivered(pipeline, "lost@example.com", 1)["lost@example.com"] == 1
    assert client.campaign_status("transactional").swept >= 1


def test_a_retry_with_the_same_key_publishes_again_and_sends_once(make_pipeline):
    pipeline = make_pipeline("tls", SES_TASKS_REDELIVER_AFTER_S="3600")
    broken = _unreachable_broker_client(pipeline)
    fields = {
        "from_": "app@example.com",
        "to": ["retry@example.com"],
        "subject": "Receipt",
        "text": "thanks",
        # Unique per run: results live in the result backend, outside the key prefix.
        "idempotency_key": f"order-{uuid.uuid4().hex}",
    }
    first = broken.send_email(**fields)
    client = pipeline.client
    assert client.message_status(first.message_id).state.value == "queued"
    pipeline.start_worker(concurrency=1)
    second = client.send_email(**fields)  # the caller's natural retry
    assert second.message_id == first.message_id
    assert second.get(timeout=60)["state"] == "sent"
    third = client.send_email(**fields)  # and once more, after it was sent: nothing new
    assert third.get(timeout=10)["state"] == "sent"
    pipeline.sandbox.stop()
    delivered = Counter(r for m in pipeline.sandbox.accepted() for r in m["rcpt_tos"])
    assert delivered["retry@example.com"] == 1


def test_a_campaign_needs_no_broker_to_be_stored_and_is_sent_later(make_pipeline, tmp_path):
    """Producers store batches in Redis; the fleet's dispatcher publishes them."""
    pipeline = make_pipeline("tls", SES_TASKS_SWEEP_INTERVAL_S="0.5")
    broken = _unreachable_broker_client(pipeline)
    status = broken.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello",
        recipients=[f"b{i}@example.com" for i in range(30)],
        campaign_id="stored",
    )
    assert status.total == 30 and status.enqueued_all
    client = pipeline.client
    assert client.store.ledger_size("stored") == 1 and client.store.backlog_size("stored") == 1
    pipeline.start_worker(concurrency=1)
    final = pipeline.wait_done(status.id, timeout_s=60)
    assert final.counts["sent"] == 30
    pipeline.sandbox.stop()
    delivered = Counter(r for m in pipeline.sandbox.accepted() for r in m["rcpt_tos"])
    assert len(delivered) == 30 and max(delivered.values()) == 1
