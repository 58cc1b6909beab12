"""Celery tasks: thin, synchronous shells around ``delivery`` on the worker's event loop.

A batch task runs ``delivery.deliver`` and publishes the follow-up batches it returns
(already in the ledger, so a failed publish is swept later, never lost). It hands the
batch to the process's event loop and returns as soon as the process has room for another
(``BATCHES_PER_PROCESS``): several batches share the process's connections, so none idles
while one batch waits for its last replies. The batch settles on the loop; a crash
meanwhile is covered by the ledger like any other (the sweeper takes the batch over after
its lease). The single-message task is a batch of one at transactional priority; its task
id is the message id, and it ends in Celery's RETRY state while a follow-up is pending, so
``AsyncResult.get()`` waits for the final record.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from ses_tasks import events
from ses_tasks.errors import ConfigurationError
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.ops import logs, metrics, observe
from ses_tasks.queue.app import BATCH_TASK, MESSAGE_TASK, app, bulk_queue
from ses_tasks.queue.publish import publish_job
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.states import OPEN_STATES, MessageState
from ses_tasks.worker.delivery import (
    STORE_ERRORS,
    BatchItem,
    BatchJob,
    BatchReport,
    StoreUnavailableError,
    deliver,
)
from ses_tasks.worker.runtime import WorkerRuntime, get_runtime, shutdown_runtime

__all__ = ["send_batch", "send_message"]

log = logging.getLogger(__name__)

#: Custom Celery state of a batch whose messages are being sent (visible in Flower).
SENDING_STATE = "SENDING"
#: When the status store stayed unreachable past STORE_RETRY_S, try the task again after.
STORE_DOWN_RETRY_S = 2.0
#: A batch for a profile this worker lacks goes back to the broker, for another worker.
NO_PROFILE_RETRY_S = 10.0


# Main process: metrics exporter (before the pool forks) and log filters/JSON on its handlers.
worker_init.connect(metrics.start_exporter, weak=False)
worker_shutdown.connect(metrics.stop_exporter, weak=False)
after_setup_logger.connect(logs.celery_after_setup_logger, weak=False)
after_setup_task_logger.connect(logs.celery_after_setup_logger, weak=False)


def _publish(runtime: WorkerRuntime, job: BatchJob, countdown_s: float) -> None:
    publish_job(app, runtime.settings.endpoint.mode, job, countdown_s)


def _takes_bulk() -> bool:
    consumed = getattr(app.amqp.queues, "consume_from", None)
    if not consumed:
        return True
    return any(name in consumed for name in (bulk_queue(mode) for mode in PortMode))


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    runtime = get_runtime()
    # Without -Q (e.g. `celery -A ...`) a worker consumes every declared queue.
    queues = app.amqp.queues
    runtime.consumed_queues = tuple(getattr(queues, "consume_from", None) or queues)
    if not _takes_bulk():  # a transactional-only worker adds nothing to the bulk window
        runtime.bulk_capacity = 0
    runtime.start_fleet_loops(lambda job: _publish(runtime, job, 0.0))
    if metrics.enabled():
        metrics.setup_worker_process(runtime)
    _setup_events(runtime)


def _setup_events(runtime: WorkerRuntime) -> None:
    """Delivery events of this pool process: SES_TASKS_EVENT_HOOKS / EVENT_TASK, called
    from the process's event thread (``ses_tasks.events``) after outcomes are recorded."""
    try:
        dispatcher = events.configure(runtime.settings)
    except ConfigurationError as exc:  # `ses-tasks worker` refused to start already
        log.error("delivery events are off in this process: %s", exc)
        return
    stale = [o for o in observe.observers if isinstance(o, events.EventObserver)]
    for observer in stale:  # one observer per process, even if init ran again
        observe.observers.remove(observer)
    if dispatcher.active:
        observe.register(events.EventObserver(dispatcher))


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    metrics.shutdown_worker_process()
    events.shutdown(timeout_s=5.0)
    shutdown_runtime()


def _publish_follow_ups(runtime: WorkerRuntime, report: BatchReport) -> None:
    """Publish what the batch left for later; a failure leaves it to the sweeper."""
    failed: list[BatchJob] = []
    for follow_up in report.follow_ups:
        if follow_up.stored:  # in the backlog: the dispatcher hands it out
            continue
        try:
            _publish(runtime, follow_up.job, follow_up.countdown_s)
        except Exception as exc:
            log.warning("follow-up batch %s not published (%s)", follow_up.job.batch_id, exc)
            failed.append(follow_up.job)
    for job in failed:  # due now: the sweeper republishes it at its next pass
        try:
            runtime.run(runtime.store.mark_due_now(job.campaign_id, [job.batch_id]))
        except Exception as exc:
            log.warning("batch %s stays in the ledger until it is due (%s)", job.batch_id, exc)


def _again(
    task: Task, job: BatchJob, runtime: WorkerRuntime, exc: Exception, delay_s: float
) -> None:
    """Nothing was sent (Redis is down, or this worker lacks the batch's profile): hand the
    batch back to the broker, for this or another worker to run later."""
    log.warning("batch of %s not run here (%s); published again", job.campaign_id, exc)
    try:
        _publish(runtime, job, delay_s)
    except Exception as publish_exc:
        raise Reject(publish_exc, requeue=True) from None


class _StillRunning(Exception):
    """The batch finishes on the loop and settles itself (its tail, or past TASK_TIMEOUT_S)."""


async def _deliver(runtime: WorkerRuntime, job: BatchJob) -> BatchReport:
    report = await deliver(runtime.lane(job.profile), job)
    if job.priority is Priority.BULK:  # a slot is free: the dispatcher hands out the next
        with contextlib.suppress(*STORE_ERRORS):
            await runtime.store.kick_dispatcher()
    return report


def _run(runtime: WorkerRuntime, job: BatchJob, *, overlap: bool = False) -> BatchReport:
    """Run ``job`` on the loop; with ``overlap``, return once the process has room."""
    timeout_s = runtime.settings.task_timeout_s
    runtime.lane(job.profile)  # ConfigurationError before anything starts
    with logs.log_context(campaign_id=job.campaign_id):
        future = runtime.submit(_deliver(runtime, job))
        if overlap and runtime.wait_for_room(runtime.settings.batches_per_process, timeout_s):
            # The child takes another task only while its process runs fewer than
            # BATCHES_PER_PROCESS batches, so the broker's tasks spread evenly over the
            # processes (a free child is a process with room).
            if not future.done():
                future.add_done_callback(lambda f: _later(runtime, job, f))
                raise _StillRunning
            return future.result()
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            log.warning("batch of %s still running after TASK_TIMEOUT_S", job.campaign_id)
            future.add_done_callback(lambda f: _later(runtime, job, f))
            raise _StillRunning from None


def _republish(runtime: WorkerRuntime, job: BatchJob) -> None:
    try:
        _publish(runtime, job, STORE_DOWN_RETRY_S)
    except Exception as exc:
        log.warning("batch %s stays in the ledger until it is due (%s)", job.batch_id, exc)


def _later(
    runtime: WorkerRuntime, job: BatchJob, future: concurrent.futures.Future[BatchReport]
) -> None:
    """A late batch finished: publish its follow-ups, store a single message's result.

    Runs on a thread of its own: publishing and the result backend block.
    """
    if future.cancelled():
        return
    exc = future.exception()
    if isinstance(exc, StoreUnavailableError):  # nothing was sent: run it again later
        log.warning("batch of %s not claimed (%s); published again", job.campaign_id, exc)
        runtime.spawn_publisher(lambda: _republish(runtime, job))
        return
    if exc is not None:  # its ledger entry stays: the sweeper takes it over when due
        log.error("batch of %s failed on the loop", job.campaign_id, exc_info=exc)
        return
    report = future.result()

    def finish() -> None:
        _publish_follow_ups(runtime, report)
        if job.priority is Priority.TRANSACTIONAL and not report.follow_ups and report.record:
            message_id = job.message_id(job.items[0])
            try:
                app.backend.store_result(message_id, report.record, "SUCCESS")
            except Exception as exc:
                log.warning("result of %s not stored (%s)", message_id, exc)

    runtime.spawn_publisher(finish)


@app.task(name=BATCH_TASK, bind=True, max_retries=None, acks_late=True)
def send_batch(
    self: Task, campaign_id: str, items: list[list[Any]], batch_id: str = "", profile: str = ""
) -> dict[str, Any]:
    """Send one slice of a campaign: ``items`` are ``[seq, email, variables, attempts]``."""
    runtime = get_runtime()
    job = BatchJob(
        campaign_id,
        tuple(BatchItem.from_json(i) for i in items),
        batch_id,
        Priority.BULK,
        profile,
    )
    if self.request.id:  # a custom state Flower shows while the batch is on the wire
        try:
            self.update_state(
                state=SENDING_STATE, meta={"campaign_id": campaign_id, "messages": len(items)}
            )
        except Exception as exc:  # cosmetic: never fail a batch for it
            log.debug("could not store the SENDING state: %s", exc)
    try:
        report = _run(runtime, job, overlap=bool(items))
    except StoreUnavailableError as exc:
        _again(self, job, runtime, exc, STORE_DOWN_RETRY_S)
        return {"campaign_id": campaign_id, "sent": 0, "retried": True}
    except ConfigurationError as exc:
        log.error("%s", exc)
        _again(self, job, runtime, exc, NO_PROFILE_RETRY_S)
        return {"campaign_id": campaign_id, "sent": 0, "retried": True}
    except _StillRunning:
        return {"campaign_id": campaign_id, "finishing": len(items)}
    _publish_follow_ups(runtime, report)
    return {
        "campaign_id": campaign_id,
        "sent": report.sent,
        "recorded": report.recorded,
        "follow_ups": sum(len(f.job.items) for f in report.follow_ups),
        "stopped": report.stopped,
        "unrecorded": report.unrecorded,
    }


@app.task(name=MESSAGE_TASK, bind=True, max_retries=None, acks_late=True)
def send_message(
    self: Task,
    message_id: str,
    spec: dict[str, Any],
    failures: int = 0,
    batch_id: str = "",
    profile: str = "",
) -> dict[str, Any]:
    """Send one transactional message; the result is its delivery record."""
    runtime = get_runtime()
    seq = message_id.split(".", 1)[1]
    first = next((str(v[0]) for k in ("to", "cc", "bcc") if (v := spec.get(k))), "")
    job = BatchJob(
        TRANSACTIONAL,
        (BatchItem(seq, first, {}, failures, spec),),
        batch_id,
        Priority.TRANSACTIONAL,
        profile,
    )
    try:
        with logs.log_context(message_id=message_id):
            report = _run(runtime, job)
    except StoreUnavailableError as exc:
        _again(self, job, runtime, exc, STORE_DOWN_RETRY_S)
        raise Retry(str(exc), when=STORE_DOWN_RETRY_S) from None
    except ConfigurationError as exc:
        log.error("%s", exc)
        _again(self, job, runtime, exc, NO_PROFILE_RETRY_S)
        raise Retry(str(exc), when=NO_PROFILE_RETRY_S) from None
    except _StillRunning:
        raise Ignore() from None  # its own settlement (or follow-up) sets the result
    if report.follow_ups:
        _publish_follow_ups(runtime, report)
        follow_up = report.follow_ups[0]  # one entry per message id (the ledger's key)
        raise Retry(follow_up.why, when=follow_up.countdown_s)
    if report.record is not None:
        return report.record
    record = runtime.run(runtime.stored_record(message_id))
    if MessageState(record["state"]) in OPEN_STATES:
        # A copy of a message another run (or its follow-up, same task id) is handling:
        # leave the result to that run, so get() never returns a state that is not final.
        raise Ignore()
    return record
