"""The same pipeline with RabbitMQ as the broker (Redis stays the status store)."""

from __future__ import annotations

import socket
from collections import Counter

import pytest
from kombu import Connection

from ses_tasks.queue.app import all_queues

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def amqp_url():
    if not _rabbitmq_answers():
        pytest.fail("RabbitMQ is not answering on 127.0.0.1:5672 (.ci/run starts it)")
    with Connection(AMQP_URL) as conn:
        channel = conn.channel()
        for queue in all_queues():
            queue(channel).declare()
            queue(channel).purge()
    return AMQP_URL


def test_campaign_and_transactional_over_rabbitmq(make_pipeline, amqp_url):
    pipeline = make_pipeline("starttls", SES_TASKS_BROKER_URL=amqp_url)
    pipeline.start_worker(concurrency=2)
    client = pipeline.client
    status = client.send_campaign(
        from_="news@example.com",
        subject="Hi {{ n }}",
        text="n={{ n }}",
        recipients=[{"email": f"amqp{i}@example.com", "n": i} for i in range(250)],
        campaign_id="amqp",
    )
    result = client.send_email(
        from_="app@example.com", to=["tx@example.com"], subject="Code", text="1234"
    )
    assert result.get(timeout=60)["state"] == "sent"
    final = pipeline.wait_done(status.id)
    assert final.counts["sent"] == 250
    delivered = Counter(r for m in pipeline.accepted(at_least=251) for r in m["rcpt_tos"])
    assert len(delivered) == 251 and max(delivered.values()) == 1
