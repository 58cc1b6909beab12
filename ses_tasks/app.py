"""The Celery app: safe defaults, queues per port mode, routing.

``app`` is built from the environment at import, so ``celery -A ses_tasks.app worker`` and
``ses-tasks worker`` need nothing else. Producers may build their own with ``create_app``;
tasks are addressed by name, so any app instance can enqueue them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from .config import Settings, load_settings
from .endpoint import PortMode

__all__ = [
    "BATCH_TASK",
    "MESSAGE_TASK",
    "app",
    "bulk_queue",
    "create_app",
    "transactional_queue",
]

MESSAGE_TASK = "ses_tasks.send_message"
BATCH_TASK = "ses_tasks.send_batch"


def bulk_queue(mode: PortMode) -> str:
    return mode.queue


def transactional_queue(mode: PortMode) -> str:
    return f"{mode.queue}.transactional"


def all_queues() -> list[Queue]:
    return [
        Queue(name) for mode in PortMode for name in (bulk_queue(mode), transactional_queue(mode))
    ]


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility_s = settings.visibility_timeout_s
    mode = settings.endpoint.mode
    broker_options: dict[str, Any] = {"visibility_timeout": visibility_s}
    if settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        # Broker keys live under our prefix too: several deployments (or test runs) can
        # share one Redis without consuming each other's tasks.
        broker_options["global_keyprefix"] = f"{settings.key_prefix}:broker:"
    return {
        # JSON only: a pickle payload is refused before it is ever deserialised.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # A task is acknowledged after it ran; a worker that dies hands it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": broker_options,
        "result_backend_transport_options": {"visibility_timeout": visibility_s},
        # A result store that is briefly unreachable (Redis restarting) must not fail the
        # task: Celery would then acknowledge it and the batch would be lost. Retry instead.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "broker_connection_retry_on_startup": True,
        "task_queues": all_queues(),
        "task_default_queue": bulk_queue(mode),
        "task_routes": {
            MESSAGE_TASK: {"queue": transactional_queue(mode)},
            BATCH_TASK: {"queue": bulk_queue(mode)},
        },
        "result_expires": settings.retention_s,
        "result_extended": True,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def create_app(settings: Settings | None = None, *, include_tasks: bool = True) -> Celery:
    settings = settings or load_settings()
    celery = Celery(
        "ses_tasks",
        broker=settings.broker_url,
        backend=settings.result_backend or settings.redis_url,
        include=["ses_tasks.tasks"] if include_tasks else [],
    )
    celery.conf.update(celery_config(settings))
    celery.ses_settings = settings  # type: ignore[attr-defined]
    return celery


app = create_app()
