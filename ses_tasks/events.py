"""Delivery events for the application: hooks, an optional Celery task, message metadata.

Every message may carry ``metadata`` (a small JSON object given to ``send_email`` or, for
all of a campaign's messages, ``send_campaign``). It is kept in the status store, never in
the email, and comes back in every event about the message, so an application can find its
own row (``{"user_id": 42}``) when a message bounces.

Events (one JSON-safe dict each, see :func:`make_event` and ``docs/events.md``):

* from the worker, once the outcome is recorded: ``sent``, ``failed``, ``unknown``,
  ``suppressed`` (every recipient is on the suppression list; nothing was sent);
* from SES feedback (``ses_tasks.feedback.apply``), once per SES event (a duplicate SNS
  delivery fires nothing): ``delivered``, ``bounced``, ``complained``, ``delayed``,
  ``rejected``.

Delivery: ``SES_TASKS_EVENT_HOOKS`` (comma-separated ``package.module.callable`` or
``package.module:callable``) are called with each event in the process where it happens,
from one daemon thread per process fed by a bounded queue: a slow hook never holds up
sending; when the queue is full the event is dropped and counted
(``ses_tasks_events_dropped_total``); a hook that raises is logged and counted
(``ses_tasks_event_hook_failures_total{hook}``). ``SES_TASKS_EVENT_TASK`` names a Celery
task that is also sent each event (``send_task(name, args=[event])``, JSON), for the
application's own workers (broker ``SES_TASKS_EVENT_BROKER_URL``, default BROKER_URL without
ses-tasks' key prefix; queue ``SES_TASKS_EVENT_TASK_QUEUE``, default Celery's).
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ses_tasks.errors import ConfigurationError, ValidationError
from ses_tasks.keys import TRANSACTIONAL, Keys, campaign_of
from ses_tasks.states import ClaimDecision, MessageState

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from ses_tasks.config import Settings
    from ses_tasks.feedback.events import SesEvent
    from ses_tasks.store.tracking import Claim, Transition
    from ses_tasks.worker.delivery import BatchJob

__all__ = [
    "EVENT_HOOKS_ENV",
    "EVENT_TYPES",
    "FEEDBACK_EVENT_TYPES",
    "MAX_METADATA_BYTES",
    "WORKER_EVENT_TYPES",
    "EventDispatcher",
    "EventObserver",
    "MetadataLookup",
    "check_metadata",
    "configure",
    "dispatcher",
    "encode_metadata",
    "feedback_event",
    "load_hooks",
    "make_event",
    "shutdown",
]

log = logging.getLogger(__name__)

EVENT_HOOKS_ENV = "SES_TASKS_EVENT_HOOKS"
#: Serialised (compact JSON, UTF-8) size limit of a message's metadata.
MAX_METADATA_BYTES = 2048
#: Events the worker emits, by the state it recorded.
WORKER_EVENT_TYPES = {
    MessageState.SENT: "sent",
    MessageState.FAILED: "failed",
    MessageState.UNKNOWN: "unknown",
    MessageState.SUPPRESSED: "suppressed",
}
FEEDBACK_EVENT_TYPES = ("delivered", "bounced", "complained", "delayed", "rejected")
EVENT_TYPES = (*WORKER_EVENT_TYPES.values(), *FEEDBACK_EVENT_TYPES)
DEFAULT_QUEUE_SIZE = 10_000
#: Campaign metadata cached per process (it never changes once the campaign is created).
CAMPAIGN_CACHE_SIZE = 256
#: How long a process that exits waits for its queued events to reach the hooks.
EXIT_FLUSH_S = 5.0
#: At most one "queue full" warning this often (each drop is counted).
DROP_WARNING_INTERVAL_S = 10.0


# Metadata --------------------------------------------------------------------------------


def _check_json(value: Any, path: str, depth: int) -> None:
    if depth > 16:
        raise ValidationError("metadata", f"{path}: nested too deeply (at most 16 levels)")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError("metadata", f"{path}: {value} is not valid JSON")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError("metadata", f"{path}: keys must be strings, not {key!r}")
            _check_json(item, f"{path}.{key}", depth + 1)
        return
    raise ValidationError(
        "metadata", f"{path}: {type(value).__name__} is not a JSON value (str, number, ...)"
    )


def check_metadata(value: Any) -> dict[str, Any] | None:
    """A message's metadata, checked: a JSON object (string keys, JSON values) of at most
    ``MAX_METADATA_BYTES`` serialised; None or ``{}`` means none. ``ValidationError``
    naming ``metadata`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError(
            "metadata",
            f"must be a JSON object (a dict with string keys), not {type(value).__name__}",
        )
    _check_json(value, "metadata", 0)
    encoded = encode_metadata(value)
    if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
        raise ValidationError(
            "metadata",
            f"is {len(encoded.encode('utf-8'))} bytes as JSON; at most {MAX_METADATA_BYTES}"
            " (keep ids here, not content)",
        )
    return json.loads(encoded) if value else None


def encode_metadata(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode_metadata(raw: Any) -> dict[str, Any]:
    """A stored metadata field ({} for none or unreadable)."""
    if raw in (None, b"", ""):
        return {}
    try:
        value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class MetadataLookup:
    """Reads metadata from the status store: a single message's own record, or its
    campaign's record (cached: it never changes)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._campaigns: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def campaign(self, campaign_id: str) -> dict[str, Any]:
        with self._lock:
            cached = self._campaigns.get(campaign_id)
        if cached is not None:
            return cached
        value = decode_metadata(self.redis.hget(self.keys.campaign(campaign_id), "metadata"))
        with self._lock:
            self._campaigns[campaign_id] = value
            while len(self._campaigns) > CAMPAIGN_CACHE_SIZE:
                self._campaigns.popitem(last=False)
        return value

    def messages(self, message_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """message id -> metadata (``{}`` when it has none)."""
        out: dict[str, dict[str, Any]] = {}
        single = [m for m in message_ids if _campaign(m) == TRANSACTIONAL]
        if single:
            pipe = self.redis.pipeline(transaction=False)
            for mid in single:
                pipe.hget(self.keys.message(mid), "metadata")
            for mid, raw in zip(single, pipe.execute(), strict=True):
                out[mid] = decode_metadata(raw)
        for mid in message_ids:
            if mid not in out:
                campaign_id = _campaign(mid)
                out[mid] = self.campaign(campaign_id) if campaign_id else {}
        return out


def _campaign(message_id: str) -> str:
    try:
        return campaign_of(message_id)
    except ValueError:
        return ""


# Events ----------------------------------------------------------------------------------


def make_event(
    type_: str,
    *,
    message_id: str,
    recipient: str | None = None,
    ses_message_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
    at: float | None = None,
    campaign_id: str | None = None,
) -> dict[str, Any]:
    """One event: ``type``, ``message_id``, ``campaign_id`` (``transactional`` for a single
    message), ``recipient``, ``ses_message_id``, ``metadata`` (``{}`` for none),
    ``details`` (per type) and ``at`` (Unix seconds)."""
    return {
        "type": type_,
        "message_id": message_id,
        "campaign_id": campaign_id if campaign_id is not None else _campaign(message_id),
        "recipient": recipient,
        "ses_message_id": ses_message_id,
        "metadata": dict(metadata or {}),
        "details": dict(details or {}),
        "at": time.time() if at is None else at,
    }


def _recipients(items: Iterable[Any]) -> list[dict[str, str]]:
    return [
        {
            "email": r.email,
            "status": r.status,
            "action": r.action,
            "diagnostic_code": r.diagnostic_code,
        }
        for r in items
    ]


def feedback_details(event: SesEvent) -> tuple[str, dict[str, Any]] | None:
    """The event type and details of an SES feedback event; None for other kinds."""
    from ses_tasks.feedback.events import (
        Bounce,
        Complaint,
        Delivery,
        DeliveryDelay,
        Reject,
    )

    detail = event.detail
    if isinstance(detail, Delivery):
        return "delivered", {
            "recipients": list(detail.recipients),
            "timestamp": detail.timestamp,
            "processing_time_ms": detail.processing_time_ms,
            "smtp_response": detail.smtp_response,
            "reporting_mta": detail.reporting_mta,
        }
    if isinstance(detail, Bounce):
        return "bounced", {
            "bounce_type": detail.bounce_type,
            "bounce_subtype": detail.bounce_subtype,
            "permanent": detail.permanent,
            "recipients": _recipients(detail.recipients),
            "timestamp": detail.timestamp,
            "feedback_id": detail.feedback_id,
            "reporting_mta": detail.reporting_mta,
        }
    if isinstance(detail, Complaint):
        return "complained", {
            "complaint_type": detail.feedback_type,
            "complaint_sub_type": detail.sub_type,
            "recipients": list(detail.recipients),
            "timestamp": detail.timestamp,
            "feedback_id": detail.feedback_id,
            "user_agent": detail.user_agent,
        }
    if isinstance(detail, DeliveryDelay):
        return "delayed", {
            "delay_type": detail.delay_type,
            "recipients": _recipients(detail.recipients),
            "timestamp": detail.timestamp,
            "expiration_time": detail.expiration_time,
            "reporting_mta": detail.reporting_mta,
        }
    if isinstance(detail, Reject):
        return "rejected", {"reason": detail.reason}
    return None


# Hooks -----------------------------------------------------------------------------------

Hook = Callable[[dict[str, Any]], Any]


def _import_hook(path: str) -> Hook:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigurationError(
            EVENT_HOOKS_ENV, f"{path!r}: give a dotted path, package.module.function"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigurationError(
            EVENT_HOOKS_ENV, f"{path!r}: cannot import {module_name} ({type(exc).__name__}: {exc})"
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                EVENT_HOOKS_ENV, f"{path!r}: {module_name} has no attribute {attr!r}"
            ) from None
    if not callable(target):
        raise ConfigurationError(EVENT_HOOKS_ENV, f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]


def _setup_django() -> None:
    """A Django project's worker (``DJANGO_SETTINGS_MODULE`` set): set Django up before the
    hooks are imported, so they may import models and their receivers are connected."""
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return
    try:
        import django
        from django.apps import apps
    except ImportError:
        return
    if not apps.ready:
        try:
            django.setup()
        except Exception as exc:
            raise ConfigurationError(
                EVENT_HOOKS_ENV, f"django.setup() failed ({type(exc).__name__}: {exc})"
            ) from None


def load_hooks(spec: str | Sequence[str]) -> list[tuple[str, Hook]]:
    """``"a.b.on_event, c.d:handler"`` -> [(name, callable)]; ``ConfigurationError``
    naming SES_TASKS_EVENT_HOOKS for a path that does not import or is not callable."""
    paths = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[tuple[str, Hook]] = []
    if any(paths):
        _setup_django()
    for raw in paths:
        path = raw.strip()
        if path and path not in (name for name, _ in out):
            out.append((path, _import_hook(path)))
    return out


def _count_failure(hook: str) -> None:
    try:
        from ses_tasks.ops import metrics

        metrics.event_hook_failed(hook)
    except Exception:  # never let counting fail the delivery of the next event
        log.debug("could not count a hook failure", exc_info=True)


def _count_drop() -> None:
    try:
        from ses_tasks.ops import metrics

        metrics.event_dropped()
    except Exception:
        log.debug("could not count a dropped event", exc_info=True)


Produce = Callable[[], Iterable[dict[str, Any]]]


class EventDispatcher:
    """One process's event delivery: a bounded queue and one daemon thread calling hooks."""

    def __init__(
        self,
        hooks: Sequence[tuple[str, Hook]] = (),
        *,
        task: str | None = None,
        task_queue: str | None = None,
        celery_app: Celery | Callable[[], Celery] | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        metadata: MetadataLookup | Callable[[], MetadataLookup] | None = None,
    ) -> None:
        self.hooks = list(hooks)
        self.task = task or None
        self.task_queue = task_queue or None
        self._celery = celery_app
        self._metadata = metadata
        self.queue_size = queue_size
        self.dropped = 0
        self.failures = 0
        self._queue: queue.Queue[Produce] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._last_drop_warning = 0.0

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.hooks) or "no hooks"
        return f"<EventDispatcher {names}{f' task={self.task}' if self.task else ''}>"

    @property
    def active(self) -> bool:
        return bool(self.hooks or self.task)

    def metadata(self) -> MetadataLookup | None:
        lookup = self._metadata
        if lookup is not None and not isinstance(lookup, MetadataLookup):
            with self._lock:
                if not isinstance(self._metadata, MetadataLookup) and self._metadata is not None:
                    self._metadata = self._metadata()
                lookup = self._metadata
        return lookup if isinstance(lookup, MetadataLookup) else None

    def _celery_app(self) -> Celery:
        app = self._celery
        if app is None:
            raise ConfigurationError("SES_TASKS_EVENT_TASK", "no Celery app to send events with")
        if not hasattr(app, "send_task"):
            with self._lock:
                if not hasattr(self._celery, "send_task"):
                    self._celery = self._celery()  # type: ignore[misc,operator]
            app = self._celery
        return app  # type: ignore[return-value]

    # Producing (any thread, the worker's event loop included): never blocks -----------

    def submit(self, produce: Produce) -> bool:
        """Queue work that yields events (run on the dispatcher's thread); False if dropped."""
        if not self.active:
            return False
        self._ensure_thread()
        try:
            self._queue.put_nowait(produce)
        except queue.Full:
            self.dropped += 1
            _count_drop()
            now = time.monotonic()
            if now - self._last_drop_warning > DROP_WARNING_INTERVAL_S:
                self._last_drop_warning = now
                log.warning(
                    "event queue full (%d): dropping events (%d so far); hooks are too slow",
                    self.queue_size,
                    self.dropped,
                )
            return False
        return True

    def emit(self, event: dict[str, Any]) -> bool:
        return self.submit(lambda: [event])

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's thread and queue stay there
                self._queue = queue.Queue(maxsize=self.queue_size)
                self._pid = os.getpid()
                self._thread = None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ses-tasks-events", daemon=True
                )
                self._thread.start()
                # A short-lived process (``feedback ingest``) lets its events out first.
                atexit.register(self.flush, EXIT_FLUSH_S)

    # The thread -------------------------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        while True:
            produce = q.get()
            try:
                for event in produce():
                    self.deliver(event)
            except Exception:
                log.exception("building delivery events failed")
                self.failures += 1
                _count_failure("events")
            finally:
                q.task_done()

    def deliver(self, event: dict[str, Any]) -> None:
        """Call every hook (and send the task) with one event, now, on this thread."""
        for name, hook in self.hooks:
            try:
                hook(event)
            except Exception:
                self.failures += 1
                log.exception(
                    "event hook %s failed on %s of %s",
                    name,
                    event.get("type"),
                    event.get("message_id"),
                )
                _count_failure(name)
        if self.task:
            try:
                options: dict[str, Any] = {"serializer": "json"}
                if self.task_queue:
                    options["queue"] = self.task_queue
                self._celery_app().send_task(self.task, args=[event], **options)
            except Exception:
                self.failures += 1
                log.exception("event task %s: could not send %s", self.task, event.get("type"))
                _count_failure(f"task:{self.task}")

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event was handled; False on timeout."""
        if self._thread is None or self._pid != os.getpid():
            return True
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


# The worker side -------------------------------------------------------------------------


class EventObserver:
    """The ``ses_tasks.ops.observe`` observer that turns recorded outcomes into events.

    Called on the worker's event loop: it only notes what was recorded and queues it; the
    dispatcher's thread reads the metadata and calls the hooks.
    """

    def __init__(self, events: EventDispatcher) -> None:
        self.events = events

    def message_outcome(self, outcome: str, *, priority: str) -> None:
        pass

    def message_recorded(self, state: str, count: int) -> None:
        pass

    def send_latency(self, seconds: float) -> None:
        pass

    def limiter_wait(self, seconds: float, *, priority: str) -> None:
        pass

    def retry_scheduled(self, why: str, count: int) -> None:
        pass

    def transitions_recorded(self, job: BatchJob, transitions: Sequence[Transition]) -> None:
        wanted = [t for t in transitions if t.state in WORKER_EVENT_TYPES]
        if not wanted:
            return
        at = time.time()
        emails = {job.message_id(item): item.email for item in job.items}
        notes = [
            (
                WORKER_EVENT_TYPES[t.state],
                t.message_id,
                emails.get(t.message_id),
                t.ses_message_id,
                {"code": t.code, "reason": t.reason},
            )
            for t in wanted
        ]
        self.events.submit(lambda: self._events(job.campaign_id, notes, at))

    def claims_recorded(self, job: BatchJob, claims: Sequence[Claim]) -> None:
        """The claim itself recorded these (suppressed recipients)."""
        suppressed = [c for c in claims if c.decision is ClaimDecision.SUPPRESSED]
        if not suppressed:
            return
        at = time.time()
        emails = {job.message_id(item): item.email for item in job.items}
        reason = {"code": 0, "reason": "recipient is on the suppression list"}
        notes = [
            ("suppressed", c.message_id, emails.get(c.message_id), None, reason) for c in suppressed
        ]
        self.events.submit(lambda: self._events(job.campaign_id, notes, at))

    def _events(
        self,
        campaign_id: str,
        notes: Sequence[tuple[str, str, str | None, str | None, dict[str, Any]]],
        at: float,
    ) -> list[dict[str, Any]]:
        metadata: dict[str, dict[str, Any]] = {}
        lookup = self.events.metadata()
        if lookup is not None:
            try:
                metadata = lookup.messages([mid for _, mid, _, _, _ in notes])
            except Exception as exc:
                log.warning("events of %s sent without metadata (%s)", campaign_id, exc)
        return [
            make_event(
                type_,
                message_id=mid,
                campaign_id=campaign_id,
                recipient=email,
                ses_message_id=ses_id,
                metadata=metadata.get(mid),
                details=details,
                at=at,
            )
            for type_, mid, email, ses_id, details in notes
        ]


def feedback_event(
    events: EventDispatcher,
    event: SesEvent,
    *,
    message_id: str,
    suppressed: Sequence[str] = (),
    lookup: MetadataLookup | None = None,
) -> None:
    """Queue the event of one applied SES feedback event (the caller checked it was new)."""
    described = feedback_details(event)
    if described is None or not events.active:
        return
    type_, details = described
    if suppressed:
        details["suppressed"] = list(suppressed)
    recipients = event.recipients
    at = time.time()

    def produce() -> list[dict[str, Any]]:
        metadata: dict[str, Any] = {}
        found = lookup or events.metadata()
        if found is not None:
            try:
                metadata = found.messages([message_id]).get(message_id, {})
            except Exception as exc:
                log.warning("%s event of %s sent without metadata (%s)", type_, message_id, exc)
        return [
            make_event(
                type_,
                message_id=message_id,
                recipient=recipients[0] if recipients else None,
                ses_message_id=event.ses_message_id,
                metadata=metadata,
                details=details,
                at=at,
            )
        ]

    events.submit(produce)


# The process's dispatcher ----------------------------------------------------------------

_dispatcher: EventDispatcher | None = None
_dispatcher_lock = threading.Lock()


def _plain_celery(settings: Settings) -> Callable[[], Celery]:
    def make() -> Celery:
        from celery import Celery

        app = Celery("ses_tasks_events", set_as_current=False)
        app.conf.update(
            broker_url=settings.event_broker_url or settings.broker_url,
            task_serializer="json",
            accept_content=["json"],
        )
        return app

    return make


def from_settings(settings: Settings, *, celery_app: Celery | None = None) -> EventDispatcher:
    """A dispatcher as ``settings`` say; ``ConfigurationError`` for a hook that does not
    import."""
    hooks = load_hooks(settings.event_hooks)

    def lookup() -> MetadataLookup:
        from ses_tasks.store.connections import sync_redis

        client = sync_redis(settings.redis_url, settings=settings)
        return MetadataLookup(client, Keys(settings.key_prefix))

    return EventDispatcher(
        hooks,
        task=settings.event_task,
        task_queue=settings.event_task_queue,
        celery_app=celery_app or _plain_celery(settings),
        queue_size=settings.event_queue_size,
        metadata=lookup,
    )


def configure(
    settings: Settings | None = None, *, events: EventDispatcher | None = None
) -> EventDispatcher:
    """Set this process's dispatcher (from ``settings``, or the one given); returns it."""
    global _dispatcher
    if events is None:
        if settings is None:
            from ses_tasks.config import load_settings

            settings = load_settings()
        events = from_settings(settings)
    with _dispatcher_lock:
        old, _dispatcher = _dispatcher, events
    if old is not None and old is not events:
        old.flush(1.0)
    return events


def dispatcher() -> EventDispatcher:
    """This process's dispatcher, configured from the environment on first use."""
    if _dispatcher is not None:
        return _dispatcher
    try:
        return configure()
    except ConfigurationError as exc:
        log.error("delivery events are off: %s", exc)
        return configure(events=EventDispatcher())


def shutdown(timeout_s: float = 5.0) -> None:
    """Let queued events reach their hooks before the process exits."""
    if _dispatcher is not None and not _dispatcher.flush(timeout_s):
        log.warning("process exiting with delivery events still queued")
