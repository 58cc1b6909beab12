"""Prometheus metrics for a worker: counted in the pool processes, served by the main one.

Celery's prefork pool runs tasks in child processes, so counters live in
prometheus-client's multiprocess mode: each child writes its own files under
``PROMETHEUS_MULTIPROC_DIR`` and the main process (which never sends) merges them at scrape
time with ``MultiProcessCollector``. Wiring, all done by ``ses_tasks.queue.tasks``:

* ``worker_init`` (main process, before the pool forks): :func:`start_exporter` picks or
  creates the directory *before* prometheus-client is first imported (it reads the variable
  at import), then serves ``/metrics`` on ``SES_TASKS_METRICS_PORT``.
* ``worker_process_init`` (each child): :func:`setup_worker_process` registers
  :class:`PrometheusObserver` with ``ses_tasks.ops.observe`` and refreshes the pool gauges
  every few seconds on the runtime's event loop.
* ``worker_process_shutdown``: :func:`shutdown_worker_process` drops the child's live gauges.

The fleet-wide numbers (effective rate, 24-hour quota used) live in Redis; the exporter reads
them at scrape time, so every worker's endpoint reports the same current values.

prometheus-client is the ``[metrics]`` extra; nothing here imports it unless metrics are on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ses_tasks.config import Settings
    from ses_tasks.limits.quota import QuotaStatus
    from ses_tasks.limits.ratelimit import LimiterStatus
    from ses_tasks.worker.runtime import WorkerRuntime

__all__ = [
    "FEEDBACK_REFUSAL_REASONS",
    "METRICS_PORT_ENV",
    "MULTIPROC_DIR_ENV",
    "PrometheusObserver",
    "enabled",
    "event_dropped",
    "event_hook_failed",
    "feedback_refused",
    "make_registry",
    "prepare_multiprocess_dir",
    "setup_worker_process",
    "shutdown_worker_process",
    "start_exporter",
    "stop_exporter",
]

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "SES_TASKS_METRICS_PORT"
#: Address the exporter binds (all interfaces by default, as containers need).
METRICS_ADDR_ENV = "SES_TASKS_METRICS_ADDR"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "ses_tasks"
#: How often each pool process publishes its pool gauges.
POOL_REFRESH_S = 2.0
#: A scrape must not hang on Redis: fleet gauges are skipped past this.
REDIS_SCRAPE_TIMEOUT_S = 1.0

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS_S = (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
POOL_STATES = ("in_use", "idle", "waiting")


def enabled() -> bool:
    return bool(os.environ.get(METRICS_PORT_ENV, "").strip())


# --------------------------------------------------------------------------- main process

_created_dir: str | None = None
_server: Any = None
_server_thread: threading.Thread | None = None


def prepare_multiprocess_dir() -> str:
    """Use ``PROMETHEUS_MULTIPROC_DIR`` (wiped of stale ``*.db``) or create a fresh one.

    Must run in the main process before prometheus-client is imported and before the pool
    forks: children inherit the variable. Files left by a previous run would otherwise be
    added to this run's counters.
    """
    global _created_dir
    path = os.environ.get(MULTIPROC_DIR_ENV, "").strip()
    if path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            with contextlib.suppress(OSError):
                stale.unlink()
        return path
    _created_dir = tempfile.mkdtemp(prefix="ses-tasks-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = _created_dir
    return _created_dir


def make_registry(settings: Any = None) -> Any:
    """A registry merging every pool process's files, plus the fleet gauges from Redis."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(FleetCollector(settings))
    return registry


def start_exporter(**_: Any) -> int | None:
    """``worker_init`` handler: serve ``/metrics`` when ``SES_TASKS_METRICS_PORT`` is set.

    Returns the port, or None when metrics are off. Idempotent.
    """
    global _server, _server_thread
    if not enabled():
        return None
    port = int(os.environ[METRICS_PORT_ENV])
    if _server is not None:
        return port
    prepare_multiprocess_dir()
    try:
        from prometheus_client import start_http_server
    except ImportError:
        log.error("--metrics-port needs prometheus-client: pip install 'ses-tasks[metrics]'")
        return None
    addr = os.environ.get(METRICS_ADDR_ENV, "0.0.0.0")
    _server, _server_thread = start_http_server(port, addr=addr, registry=make_registry())
    log.info(
        "metrics on http://%s:%s/metrics (%s=%s)",
        addr,
        port,
        MULTIPROC_DIR_ENV,
        os.environ[MULTIPROC_DIR_ENV],
    )
    return port


def stop_exporter(**_: Any) -> None:
    """``worker_shutdown`` handler: stop serving and remove a directory we created."""
    global _server, _server_thread, _created_dir
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
        _server_thread = None
    if _created_dir is not None:
        shutil.rmtree(_created_dir, ignore_errors=True)
        _created_dir = None


class FleetCollector:
    """Scrape-time gauges read from Redis: effective rate and 24-hour quota use.

    Each scrape runs the async ``FleetRateLimiter.status()`` and ``DailyQuota.status()`` on
    an event loop of its own (``asyncio.run`` in the scraping thread), over a client made
    for that scrape and closed before it returns: no connection or loop outlives a scrape,
    and a Redis that is down costs one short timeout, after which the gauges are skipped.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()

    def _settings_now(self) -> Settings:
        with self._lock:
            if self._settings is None:
                from ses_tasks.config import load_settings

                self._settings = load_settings()
            return self._settings

    @staticmethod
    async def _read(s: Settings) -> tuple[LimiterStatus, QuotaStatus]:
        from ses_tasks.limits.quota import DailyQuota
        from ses_tasks.limits.ratelimit import FleetRateLimiter
        from ses_tasks.store.connections import async_redis

        client = async_redis(
            s.redis_url,
            settings=s,
            socket_timeout=REDIS_SCRAPE_TIMEOUT_S,
            socket_connect_timeout=REDIS_SCRAPE_TIMEOUT_S,
        )
        try:
            limiter = FleetRateLimiter(
                client,
                key_prefix=s.key_prefix,
                rate_per_s=s.max_send_rate,
                burst=s.burst,
                transactional_reserve=s.transactional_reserve,
            )
            quota = DailyQuota(
                client, key_prefix=s.key_prefix, limit=s.max_24h_send, window_s=s.quota_window_s
            )
            return await limiter.status(), await quota.status()
        finally:
            await client.aclose()

    def _statuses(self) -> tuple[LimiterStatus, QuotaStatus]:
        s = self._settings_now()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._read(s))
        # Collected from inside a running event loop (an async app serving the registry):
        # asyncio.run cannot nest, so this scrape gets a thread, and a loop, of its own.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._read(s)).result()

    def describe(self) -> list[Any]:
        return []  # skip the scrape at registration (it would hit Redis)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            rate, used = self._statuses()
        except Exception as exc:  # Redis down: serve the process metrics anyway
            log.debug("fleet gauges skipped: %s", type(exc).__name__)
            return
        yield GaugeMetricFamily(
            f"{NAMESPACE}_effective_rate_per_second",
            "Fleet send rate the limiter allows now (recipients/s), after throttle backoff.",
            value=rate.effective_rate_per_s,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_configured_rate_per_second",
            "Configured fleet send rate (MAX_SEND_RATE, recipients/s).",
            value=rate.configured_rate_per_s,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_quota_used",
            "Recipients sent in the rolling 24-hour window.",
            value=used.used,
        )
        # Always present (+Inf without MAX_24H_SEND), so quota ratios return data.
        yield GaugeMetricFamily(
            f"{NAMESPACE}_quota_limit",
            "Rolling 24-hour sending quota (MAX_24H_SEND; +Inf when not set).",
            value=float("inf") if used.limit is None else used.limit,
        )


# --------------------------------------------------------------------------- pool processes


class PrometheusObserver:
    """The ``ses_tasks.ops.observe.Observer`` that counts into prometheus-client metrics."""

    def __init__(self, registry: Any = None, *, runtime: WorkerRuntime | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        #: When set, pool gauges are refreshed after every recorded flush as well.
        self.runtime = runtime
        reg = REGISTRY if registry is None else registry
        self.messages = Counter(
            "messages",
            "SMTP transactions by outcome (sent, throttled, transient, permanent, ...).",
            ["outcome", "priority"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.recorded = Counter(
            "messages_recorded",
            "Messages recorded in the status store, by state.",
            ["state"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.retries = Counter(
            "retries",
            "Messages scheduled for another try, by reason.",
            ["why"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self.latency = Histogram(
            "send_latency_seconds",
            "Time from handing a message to the pool to the endpoint's reply.",
            buckets=LATENCY_BUCKETS_S,
            namespace=NAMESPACE,
            registry=reg,
        )
        self.limiter_wait_s = Histogram(
            "limiter_wait_seconds",
            "Time spent waiting for fleet rate-limit tokens.",
            ["priority"],
            buckets=WAIT_BUCKETS_S,
            namespace=NAMESPACE,
            registry=reg,
        )
        self.pool = Gauge(
            "pool_connections",
            "SMTP connections of live pool processes by state (waiting: senders queued).",
            ["state"],
            namespace=NAMESPACE,
            registry=reg,
            multiprocess_mode="livesum",
        )

    def message_outcome(self, outcome: str, *, priority: str) -> None:
        self.messages.labels(outcome=outcome, priority=priority).inc()

    def message_recorded(self, state: str, count: int) -> None:
        self.recorded.labels(state=state).inc(count)
        if self.runtime is not None:
            self.update_pool(self.runtime)

    def send_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def limiter_wait(self, seconds: float, *, priority: str) -> None:
        self.limiter_wait_s.labels(priority=priority).observe(seconds)

    def retry_scheduled(self, why: str, count: int) -> None:
        self.retries.labels(why=why).inc(count)

    def update_pool(self, runtime: WorkerRuntime) -> None:
        stats = runtime.pool.stats
        self.pool.labels(state="in_use").set(stats.in_use)
        self.pool.labels(state="idle").set(stats.idle)
        self.pool.labels(state="waiting").set(stats.waiting)


_observer: PrometheusObserver | None = None
_observer_pid = -1


def setup_worker_process(runtime: WorkerRuntime | None = None) -> PrometheusObserver | None:
    """``worker_process_init``: count this process's deliveries; None when metrics are off."""
    global _observer, _observer_pid
    if not enabled() or not os.environ.get(MULTIPROC_DIR_ENV):
        return None
    if _observer is not None and _observer_pid == os.getpid():
        return _observer
    if runtime is None:
        from ses_tasks.worker.runtime import get_runtime

        runtime = get_runtime()
    try:
        observer = PrometheusObserver(runtime=runtime)
    except ImportError:
        return None
    from ses_tasks.ops.observe import register

    register(observer)
    _observer, _observer_pid = observer, os.getpid()
    asyncio.run_coroutine_threadsafe(_refresh_pool(observer, runtime), runtime.loop)
    return observer


async def _refresh_pool(observer: PrometheusObserver, runtime: WorkerRuntime) -> None:
    while True:
        try:
            observer.update_pool(runtime)
        except Exception:  # never let a gauge kill the loop task
            log.debug("pool gauge refresh failed", exc_info=True)
        await asyncio.sleep(POOL_REFRESH_S)


def shutdown_worker_process(**_: Any) -> None:
    """``worker_process_shutdown``: this process's live gauges stop counting."""
    if _observer is None or _observer_pid != os.getpid():
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


# --------------------------------------------------------------------------- feedback receiver

#: ``reason`` values of ``ses_tasks_feedback_refused_total``. A fixed set, so hostile requests
#: cannot grow the number of series; anything else is counted as ``other``.
FEEDBACK_REFUSAL_REASONS = frozenset(
    {
        "not_json",
        "not_sns",
        "header_mismatch",
        "body_too_large",
        "malformed",
        "type",
        "topic",
        "timestamp",
        "signature",
        "cert_url",
        "cert_fetch",
        "cert_invalid",
        "confirm",
        "other",
    }
)

_web_counters: dict[str, Any] = {}
_web_lock = threading.Lock()


def _web_counter(name: str, documentation: str, labels: list[str]) -> Any:
    """A counter of the receiving web process (``feedback serve``, Django, Flask), created on
    first use; None without prometheus-client.

    Never in a worker, so the lazy import cannot precede ``prepare_multiprocess_dir``.
    """
    with _web_lock:
        if name not in _web_counters:
            try:
                from prometheus_client import Counter
            except ImportError:
                _web_counters[name] = None
            else:
                _web_counters[name] = Counter(name, documentation, labels, namespace=NAMESPACE)
        return _web_counters[name]


def feedback_refused(reason: str) -> None:
    """Count one refused SNS feedback request (``ses_tasks_feedback_refused_total{reason}``)."""
    label = reason if reason in FEEDBACK_REFUSAL_REASONS else "other"
    counter = _web_counter(
        "feedback_refused",
        "SNS feedback requests refused, by reason (topic, signature, ...).",
        ["reason"],
    )
    if counter is not None:
        counter.labels(reason=label).inc()


#: ``type`` label values of ``ses_tasks_feedback_events_total``.
FEEDBACK_EVENT_TYPES = frozenset({"delivery", "bounce", "complaint", "delivery_delay", "reject"})


def feedback_event(event_type: str, status: str) -> None:
    """Count one SES event applied (``ses_tasks_feedback_events_total{type,status}``):
    deliveries, bounces and complaints as SES reported them, by what we did with them
    (``applied``, ``duplicate``, ``uncorrelated``)."""
    counter = _web_counter(
        "feedback_events",
        "SES delivery, bounce, complaint, delay and reject events received, by status.",
        ["type", "status"],
    )
    if counter is not None and event_type in FEEDBACK_EVENT_TYPES:
        counter.labels(type=event_type, status=status).inc()


# --------------------------------------------------------------------------- delivery events


def event_hook_failed(hook: str) -> None:
    """Count one delivery-event hook that raised (``ses_tasks_event_hook_failures_total{hook}``),
    in whichever process called it: a worker's pool process (summed over processes by the
    multiprocess collector, like ``PrometheusObserver``'s counters) or a feedback receiver."""
    counter = _web_counter(
        "event_hook_failures",
        "Delivery-event hooks (SES_TASKS_EVENT_HOOKS, the event task) that raised, by hook.",
        ["hook"],
    )
    if counter is not None:
        counter.labels(hook=hook[:200]).inc()


def event_dropped() -> None:
    """Count one delivery event dropped because the process's event queue was full
    (``ses_tasks_events_dropped_total``): the hooks are slower than the mail."""
    counter = _web_counter(
        "events_dropped",
        "Delivery events dropped because the hooks fell behind (the event queue was full).",
        [],
    )
    if counter is not None:
        counter.inc()
