"""Celery tasks: thin, synchronous shells around ``delivery`` on the worker's event loop.

Retries are new deliveries of a task: the single-message task retries itself (its id is the
message id, so ``AsyncResult.get()`` waits for the final record); a batch enqueues follow-up
batches for just the messages that need another try, each with its own delay.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from . import delivery, logs, metrics
from .app import BATCH_TASK, MESSAGE_TASK, app
from .keys import TRANSACTIONAL
from .quota import QuotaUnavailableError
from .ratelimit import LimiterUnavailableError
from .workers.runtime import get_runtime, shutdown_runtime

__all__ = ["send_batch", "send_message"]

log = logging.getLogger(__name__)

#: Custom Celery state of a batch whose messages are being sent (visible in Flower).
SENDING_STATE = "SENDING"
#: When the status store (Redis) is unreachable, try again after this long.
STORE_DOWN_RETRY_S = 2.0
#: Redis unreachable (status store, limiter or quota): the task is retried, not lost.
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    LimiterUnavailableError,
    QuotaUnavailableError,
)


# Main process: metrics exporter (before the pool forks) and log filters/JSON on its handlers.
worker_init.connect(metrics.start_exporter, weak=False)
worker_shutdown.connect(metrics.stop_exporter, weak=False)
after_setup_logger.connect(logs.celery_after_setup_logger, weak=False)
after_setup_task_logger.connect(logs.celery_after_setup_logger, weak=False)


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    runtime = get_runtime()
    if metrics.enabled():
        metrics.setup_worker_process(runtime)


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    metrics.shutdown_worker_process()
    shutdown_runtime()


@app.task(name=BATCH_TASK, bind=True, max_retries=None, acks_late=True)
def send_batch(self: Task, campaign_id: str, items: list[list[Any]]) -> dict[str, Any]:
    """Send one slice of a campaign: ``items`` are ``[seq, email, variables, failures]``."""
    runtime = get_runtime()
    if self.request.id:  # a custom state Flower shows while the batch is on the wire
        self.update_state(
            state=SENDING_STATE, meta={"campaign_id": campaign_id, "messages": len(items)}
        )
    try:
        with logs.log_context(campaign_id=campaign_id):
            report = runtime.run(delivery.process_batch(runtime, campaign_id, items))
    except REDIS_DOWN as exc:
        log.warning("status store unreachable (%s); batch of %s retried", exc, campaign_id)
        raise self.retry(countdown=STORE_DOWN_RETRY_S) from None
    for follow_up in report.follow_ups:
        send_batch.apply_async((campaign_id, follow_up.items), countdown=follow_up.countdown_s)
    return {
        "campaign_id": campaign_id,
        "sent": report.sent,
        "recorded": report.recorded,
        "follow_ups": sum(len(f.items) for f in report.follow_ups),
        "stopped": report.stopped,
    }


@app.task(name=MESSAGE_TASK, bind=True, max_retries=None, acks_late=True)
def send_message(
    self: Task, message_id: str, spec: dict[str, Any], failures: int = 0
) -> dict[str, Any]:
    """Send one transactional message; the result is its delivery record."""
    runtime = get_runtime()
    try:
        with logs.log_context(campaign_id=TRANSACTIONAL, message_id=message_id):
            decision = runtime.run(delivery.process_message(runtime, message_id, spec, failures))
    except REDIS_DOWN as exc:
        log.warning("status store unreachable (%s); message %s retried", exc, message_id)
        raise self.retry(countdown=STORE_DOWN_RETRY_S) from None
    if decision.retry_in_s is not None:
        raise self.retry(
            args=(message_id, spec, decision.failures), countdown=decision.retry_in_s
        )
    return decision.record
