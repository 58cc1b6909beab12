"""The Celery app: safe defaults, queues per port mode, routing, broker resilience.

``app`` reads no environment at import: its configuration is built from ``load_settings()``
the first time Celery needs it (a worker starting, a task being sent), so importing
``ses_tasks`` (a Django or Flask integration, a producer with its own ``Settings``) never
fails on a worker-only setting. ``celery -A ses_tasks.queue.app worker`` and ``ses-tasks worker``
need nothing else. Producers may build their own with ``create_app(settings)``; tasks are
addressed by name, so any app instance can enqueue them.

Connections: the broker and the result backend get socket timeouts, TCP keepalive and
health checks (see ``ses_tasks.store.connections``); the worker reconnects to the broker for ever
and treats a Redis error reply (out of memory, no permission) like a lost connection;
publishing retries for about ten seconds; ``sentinel://...?master_name=NAME`` URLs work for
the broker and the result backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from celery import Celery, signals
from kombu import Queue

from ses_tasks.config import Settings, load_settings
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.store.connections import (
    HEALTH_CHECK_INTERVAL_S,
    celery_url,
    client_options,
    keepalive_options,
    patch_kombu_redis,
)

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

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
#: Publishing retries: pauses of 0, 0.5, 1, 1.5, 2, 2, 2, 2 s: about 11 s before a send fails.
PUBLISH_RETRY_POLICY = {
    "max_retries": 8,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}
#: Redis error replies after which storing a result is retried like a lost connection:
#: they last as long as an operator's fix (memory freed, an ACL corrected), and failing
#: the store would fail, and acknowledge, a task that did not run.
RETRYABLE_REDIS_REPLIES = (
    "redis.exceptions.OutOfMemoryError",
    "redis.exceptions.NoPermissionError",
)


def bulk_queue(mode: PortMode) -> str:
    return mode.queue


def transactional_queue(mode: PortMode) -> str:
    return f"{mode.queue}.transactional"


def all_queues() -> list[Queue]:
    return [
        Queue(name) for mode in PortMode for name in (bulk_queue(mode), transactional_queue(mode))
    ]


def _is_redis(url: str) -> bool:
    return url.strip().lower().startswith(REDIS_SCHEMES)


def _tcp(url: str) -> bool:
    return not url.strip().lower().startswith("unix://")


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Socket options for the connections to the sentinels themselves."""
    options = client_options(settings)
    options.pop("health_check_interval", None)
    return options


def broker_settings(settings: Settings) -> dict[str, Any]:
    """``broker_url`` and ``broker_transport_options``."""
    url, master_name = celery_url(settings.broker_url, setting="BROKER_URL")
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if _is_redis(url):
        # Broker keys live under our prefix too: several deployments (or test runs) can
        # share one Redis without consuming each other's tasks.
        options["global_keyprefix"] = f"{settings.key_prefix}:broker:"
        timeout = settings.redis_socket_timeout_s
        options.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            # Timeouts are not retried inside a command (it may have run); kombu and
            # Celery retry whole operations.
            retry_on_timeout=False,
        )
        if _tcp(url):
            options.update(socket_keepalive=True, socket_keepalive_options=keepalive_options())
    if master_name is not None:
        options["master_name"] = master_name
        options["sentinel_kwargs"] = _sentinel_kwargs(settings)
    return {"broker_url": url, "broker_transport_options": options}


def backend_settings(settings: Settings) -> dict[str, Any]:
    """``result_backend`` and its connection options."""
    raw = settings.result_backend or settings.redis_url
    url, master_name = celery_url(
        raw, setting="RESULT_BACKEND" if settings.result_backend else "REDIS_URL"
    )
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    conf: dict[str, Any] = {"result_backend": url}
    if _is_redis(url):
        timeout = settings.redis_socket_timeout_s
        conf.update(
            redis_socket_timeout=timeout,
            redis_socket_connect_timeout=timeout,
            redis_backend_health_check_interval=HEALTH_CHECK_INTERVAL_S,
            redis_retry_on_timeout=False,
        )
        if _tcp(url):
            conf["redis_socket_keepalive"] = True
        options["additional_connection_errors"] = list(RETRYABLE_REDIS_REPLIES)
    if master_name is not None:
        options["master_name"] = master_name
        options["sentinel_kwargs"] = _sentinel_kwargs(settings)
    conf["result_backend_transport_options"] = options
    return conf


def celery_config(settings: Settings) -> dict[str, Any]:
    mode = settings.endpoint.mode
    return {
        **broker_settings(settings),
        **backend_settings(settings),
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
        # A result store that is briefly unreachable (Redis restarting) must not fail the
        # task: Celery would then acknowledge it and the batch would be lost. Retry instead.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": 2000,
        # The broker going away is an outage to wait out, never a reason to exit: reconnect
        # for ever, at start-up too, and treat the broker's error replies (a Redis out of
        # memory or refusing writes to our ACL user) like a lost connection instead of an
        # "Unrecoverable error" that ends the worker.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        "task_queues": all_queues(),
        "task_default_queue": bulk_queue(mode),
        "task_routes": {
            MESSAGE_TASK: {"queue": transactional_queue(mode)},
            BATCH_TASK: {"queue": bulk_queue(mode)},
        },
        # Results are delivery records (ids, state, SES id), never the task's arguments:
        # with result_extended the backend would keep every message body for the retention.
        "result_expires": settings.retention_s,
        "result_extended": False,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


class _SettingsConfig(Mapping[str, Any]):
    """The app's configuration source: ``celery_config(settings)``, built on first read.

    Celery reads it when it first needs its configuration; an invalid setting raises
    ``ConfigurationError`` there, to the caller, rather than at import.
    """

    def __init__(self, app: SesTasksCelery) -> None:
        self._app = app
        self._data: dict[str, Any] | None = None

    def _config(self) -> dict[str, Any]:
        if self._data is None:
            self._data = celery_config(self._app.ses_settings)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._config()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._config())

    def __len__(self) -> int:
        return len(self._config())


class SesTasksCelery(Celery):
    """A Celery app configured from ``Settings`` when Celery first needs its configuration.

    With no ``settings``, they are loaded from the environment then, not at construction.
    """

    def __init__(self, settings: Settings | None = None, *, include_tasks: bool = True) -> None:
        self._ses_settings = settings
        super().__init__("ses_tasks", include=["ses_tasks.queue.tasks"] if include_tasks else [])
        self.config_from_object(_SettingsConfig(self))

    @property
    def ses_settings(self) -> Settings:
        if self._ses_settings is None:
            self._ses_settings = load_settings()
        return self._ses_settings


def create_app(settings: Settings | None = None, *, include_tasks: bool = True) -> Celery:
    """A configured app; settings from the environment now if none are given."""
    return SesTasksCelery(settings or load_settings(), include_tasks=include_tasks)


@signals.worker_init.connect(weak=False)
def _worker_init(sender: Any = None, **_: Any) -> None:
    if isinstance(getattr(sender, "app", None), SesTasksCelery):
        patch_kombu_redis()


app = SesTasksCelery()
