"""RabbitMQ as the broker, restarted under a running campaign (Redis stays the store).

The broker goes away with tasks in flight, queued and unacknowledged; it comes back with its
durable queues. Unacknowledged tasks are delivered again (claims make the copies harmless),
the worker reconnects by itself, and the campaign completes with each recipient once.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from ses_tasks.queue.app import all_queues
from ses_tasks.sandbox.embedded import wait_for

from .support import adds_up, delivered

pytestmark = pytest.mark.slow

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
TOTAL = 1500


def _answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> None:
    binary = shutil.which("rabbitmqctl")
    assert binary, "rabbitmqctl is not installed"
    subprocess.run([binary, *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    if not _answers():
        pytest.fail("RabbitMQ is not answering on 127.0.0.1:5672 (.ci/run starts it)")
    with Connection(AMQP_URL) as conn:
        channel = conn.channel()
        for queue in all_queues():
            queue(channel).declare()
            queue(channel).purge()
    yield AMQP_URL
    if not _answers():  # never leave the machine's broker stopped
        _rabbitmqctl("start_app")


def test_rabbitmq_restarted_mid_campaign_completes_once(make_pipeline: Any, amqp_url: str) -> None:
    pipeline = make_pipeline(
        "tls",
        SES_TASKS_BROKER_URL=amqp_url,
        SES_TASKS_MAX_SEND_RATE="150",
        SES_TASKS_SWEEP_INTERVAL_S="1",
    )
    worker = pipeline.start_worker(concurrency=1)
    main_pid = wait_for(worker.main_pid, timeout_s=30, what="Celery's main process")
    client = pipeline.client
    client.send_campaign(
        from_="news@example.com",
        subject="Hi",
        text="Hello {{ email }}",
        recipients=[f"q{i}@example.com" for i in range(TOTAL)],
        campaign_id="amqp-restart",
    )
    sent = lambda: client.campaign_status("amqp-restart").counts["sent"]  # noqa: E731
    wait_for(lambda: sent() >= 200, timeout_s=60, what="first sends")
    _rabbitmqctl("stop_app")
    wait_for(lambda: not _answers(), timeout_s=30, what="RabbitMQ to stop listening")
    _rabbitmqctl("start_app")
    wait_for(_answers, timeout_s=60, what="RabbitMQ to listen again")
    assert sent() < TOTAL, "the campaign ended before the restart: slow it down"

    final = pipeline.wait_done("amqp-restart", timeout_s=240)
    assert final.counts["sent"] == TOTAL and adds_up(final), final.to_dict()
    pipeline.sandbox.stop()
    counts = delivered(pipeline.sandbox.accepted())
    assert set(counts) == {f"q{i}@example.com" for i in range(TOTAL)}
    twice = {r: n for r, n in counts.items() if n > 1}
    assert not twice, f"sent twice by a live worker: {twice}"
    assert worker.alive() and worker.main_pid() == main_pid, "the worker was restarted"
    assert client.store.ledger_size("amqp-restart") == 0
