"""Putting batches on the broker: the one place that turns a ``BatchJob`` into a task.

Every batch is written to the ledger (``tracking``) before it is published, so a publish
that fails, or a process that dies between the two, loses nothing: the sweeper republishes
ledger entries nobody settled. A copy published twice is harmless: claims are idempotent
and a copy of a settled batch is skipped whole.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.queue.app import BATCH_TASK, MESSAGE_TASK, bulk_queue, transactional_queue
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.worker.delivery import BatchJob

__all__ = ["publish_job", "task_call"]

log = logging.getLogger(__name__)


def _profile(job: BatchJob) -> tuple[str, ...]:
    """The profile argument, only when there is one: workers of the previous release take
    the default profile's tasks during a rolling upgrade."""
    return (job.profile,) if job.profile else ()


def task_call(job: BatchJob, mode: PortMode) -> tuple[str, dict[str, Any]]:
    """The task name and ``send_task`` keyword arguments that carry ``job``."""
    if job.priority is Priority.TRANSACTIONAL and job.campaign_id == TRANSACTIONAL:
        (item,) = job.items
        message_id = job.message_id(item)
        return MESSAGE_TASK, {
            "args": (message_id, item.spec, item.attempts, job.batch_id, *_profile(job)),
            "task_id": message_id,
            "queue": transactional_queue(mode),
        }
    return BATCH_TASK, {
        "args": (job.campaign_id, [i.to_json() for i in job.items], job.batch_id, *_profile(job)),
        "queue": bulk_queue(mode),
    }


def publish_job(app: Celery, mode: PortMode, job: BatchJob, countdown_s: float = 0.0) -> None:
    """Publish one batch (kombu retries a failing broker per the app's publish policy)."""
    name, kwargs = task_call(job, mode)
    if countdown_s > 0:
        kwargs["countdown"] = countdown_s
    app.send_task(name, **kwargs)
