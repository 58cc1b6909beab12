"""End to end: real Redis, real worker processes, the sandbox over real TLS."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ses_tasks.sandbox import SES_MESSAGE_ID_RE
from ses_tasks.store.tracking import COUNTERS

from ..conftest import write_csv


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_campaign_completes_exactly_once_in_both_modes(make_pipeline, tmp_path: Path, mode):
    pipeline = make_pipeline(mode)
    pipeline.start_worker(concurrency=2)
    rows = [{"email": f"user{i}@example.com", "name": f"User {i}"} for i in range(300)]
    recipients = write_csv(tmp_path / "list.csv", rows)

    status = pipeline.client.send_campaign(
        from_="News <news@example.com>",
        subject="Hello {{ name }}",
        text="Hi {{ name }}, this is for {{ email }}.",
        html="<p>Hi {{ name }}</p>",
        recipients=recipients,
        campaign_id=f"e2e-{mode}",
    )
    final = pipeline.wait_done(status.id)

    assert final.total == 300
    assert final.counts["sent"] == 300
    assert sum(final.counts[name] for name in COUNTERS) == final.total
    accepted = pipeline.accepted(at_least=300)
    delivered = Counter(r for message in accepted for r in message["rcpt_tos"])
    assert delivered == Counter(row["email"] for row in rows)
    assert {m["mode"] for m in accepted} == {mode}
    client = pipeline.client
    by_recipient = {m["rcpt_tos"][0]: m["ses_message_id"] for m in accepted}
    for seq in (0, 150, 299):
        record = client.message_status(f"{status.id}.{seq}")
        assert record is not None and record.state.value == "sent"
        assert SES_MESSAGE_ID_RE.fullmatch(record.ses_message_id)
        assert record.ses_message_id == by_recipient[record.email]


def test_transactional_result_is_the_delivery_record(make_pipeline):
    pipeline = make_pipeline("starttls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    client = pipeline.client
    result = client.send_email(
        from_="app@example.com", to=["reset@example.com"], subject="Reset", text="Your code: 1"
    )
    record = result.get(timeout=60)
    assert record["state"] == "sent"
    assert record["message_id"] == result.message_id
    accepted = pipeline.accepted(at_least=1)
    assert [m["ses_message_id"] for m in accepted] == [record["ses_message_id"]]
    assert client.message_status(result.message_id).state.value == "sent"


def test_same_idempotency_key_sends_once(make_pipeline):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    client = pipeline.client
    fields = dict(
        from_="app@example.com",
        to=["once@example.com"],
        subject="Receipt",
        text="Thanks",
        idempotency_key="order-1234",
    )
    first = client.send_email(**fields)
    second = client.send_email(**fields)
    assert first.message_id == second.message_id
    assert first.get(timeout=60)["state"] == "sent"
    third = client.send_email(**fields)
    assert third.get(timeout=60)["state"] == "sent"
    assert len(pipeline.accepted(at_least=1)) == 1


def test_batch_results_are_json_records_in_the_result_backend(make_pipeline):
    from celery.result import AsyncResult

    from ses_tasks.queue.app import BATCH_TASK

    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1)
    client = pipeline.client
    client.store.create_campaign("flower", template=None)
    result = client.app.send_task(BATCH_TASK, args=("flower", []), queue="ses.tls")
    assert AsyncResult(result.id, app=client.app).get(timeout=60) == {
        "campaign_id": "flower",
        "sent": 0,
        "recorded": 0,
        "follow_ups": 0,
        "stopped": None,
        "unrecorded": 0,
    }
