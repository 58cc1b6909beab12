"""A producer whose queue nobody consumes says so, once, instead of queueing in silence."""

from __future__ import annotations

import logging
import time

from ses_tasks.queue.app import transactional_queue
from ses_tasks.sandbox.embedded import wait_for
from ses_tasks.smtp.endpoint import PortMode

from ..conftest import settings_from_env

WARNING = "no running worker consumes queue"


def _consumed(pipeline, queue: str) -> bool:
    client = pipeline.client
    key = client.store.keys.consumers(queue)
    return bool(client.redis.zcount(key, int(time.time() * 1000), "+inf"))


def test_a_mode_mismatch_is_named_once_and_a_match_is_silent(make_pipeline, caplog):
    pipeline = make_pipeline("tls")
    pipeline.start_worker(concurrency=1, queues="transactional")
    wait_for(
        lambda: _consumed(pipeline, transactional_queue(PortMode.TLS)),
        timeout_s=30,
        what="the worker's heartbeat",
    )
    caplog.set_level(logging.WARNING, logger="ses_tasks.produce.consumers")

    matching = pipeline.client
    assert (
        matching.send_email(
            from_="app@example.com", to=["a@example.com"], subject="s", text="t"
        ).get(timeout=60)["state"]
        == "sent"
    )
    assert WARNING not in caplog.text

    # A web process configured for the other port mode: its queue has no consumer.
    starttls = dict(pipeline.env, SES_TASKS_MODE="starttls", SES_TASKS_PORT="587")
    from ses_tasks.produce.client import SesTasks

    mismatched = SesTasks(settings_from_env(starttls))
    try:
        for i in range(3):
            mismatched.send_email(
                from_="app@example.com", to=[f"b{i}@example.com"], subject="s", text="t"
            )
    finally:  # queue names are shared by every test: leave nothing for a later worker
        with mismatched.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(transactional_queue(PortMode.STARTTLS))
    warnings = [r for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert transactional_queue(PortMode.STARTTLS) in text and "--mode starttls" in text
