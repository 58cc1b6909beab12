"""Per-process worker state that outlives tasks.

A Celery task body is synchronous; our sends are asyncio. Each worker process owns one
event loop running in a daemon thread, one warm SMTP pool, one asyncio Redis client and the
fleet limiter. Tasks hand coroutines to that loop and wait for the answer, so connections,
TLS sessions and script SHAs stay warm across tasks. Warm-up starts at process init without
blocking it; shutdown sends QUIT on every connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ConfigurationError
from ses_tasks.store.connections import async_redis
from ses_tasks.store.tracking import AsyncStatusStore, parse_message
from ses_tasks.worker.dispatcher import Dispatcher
from ses_tasks.worker.lanes import Lane, LaneView
from ses_tasks.worker.scheduler import Scheduler
from ses_tasks.worker.sweeper import Sweeper

if TYPE_CHECKING:
    from ses_tasks.worker.delivery import BatchJob

__all__ = ["WorkerRuntime", "get_runtime", "shutdown_runtime"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOSE_TIMEOUT_S = 10.0
#: How long shutdown waits for fleet loops and publishers: longer than one publish's
#: retries (the app's policy pauses ~11 s in all), so nothing taken is left unpublished.
FLEET_STOP_S = 15.0


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Identifies this process's leases on messages it is sending.
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="ses-tasks-loop", daemon=True)
        self._started = False
        self._closed = False
        self.redis: aioredis.Redis = async_redis(settings.redis_url, settings=settings)
        self.store = AsyncStatusStore(
            self.redis,
            key_prefix=settings.key_prefix,
            retention_s=settings.retention_s,
            redeliver_after_s=settings.redeliver_after,
        )
        #: One lane per sender profile ('' is the unnamed default).
        self.lanes = {
            name: Lane(name, settings.for_profile(name), self.redis, settings.failover_for(name))
            for name in ["", *settings.profiles]
        }
        default = self.lanes[""]
        self.limiter, self.quota, self.pool = default.limiter, default.quota, default.pool
        self.templates: dict[str, Any] = {}
        self._sweeper_task: concurrent.futures.Future[None] | None = None
        self._dispatcher_task: concurrent.futures.Future[None] | None = None
        self._scheduler_task: concurrent.futures.Future[None] | None = None
        #: The fleet loops' tasks on our loop, so close() can wait for them to end.
        self._fleet_tasks: set[asyncio.Task[None]] = set()
        #: Batches this process takes at once from bulk queues (0: it consumes none).
        self.bulk_capacity = settings.batches_per_process
        #: The broker queues this process's worker consumes (heartbeats name them, so a
        #: producer can tell when nobody consumes its queue).
        self.consumed_queues: tuple[str, ...] = ()
        #: Set at close: running batches hand their rest back instead of sending on.
        self.stopping = False
        self._stop_event = asyncio.Event()
        #: Threads publishing what finished batches left (joined at close).
        self._publishers: set[threading.Thread] = set()
        self._publishers_lock = threading.Lock()
        #: Batches still running on the loop (a task may have stopped waiting for one).
        self._running: set[concurrent.futures.Future[Any]] = set()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def lane(self, profile: str) -> LaneView:
        """This process as ``profile`` sends; ConfigurationError if it has no such profile."""
        lane = self.lanes.get(profile)
        if lane is None:
            raise ConfigurationError(
                "profile", f"this worker has no profile {profile!r} (SES_TASKS_PROFILES__...)"
            )
        return LaneView(self, lane)

    def start(self) -> None:
        """Start the loop thread and begin warming connections; returns at once."""
        if self._started:
            return
        self._started = True
        self._thread.start()
        for lane in self.lanes.values():
            asyncio.run_coroutine_threadsafe(lane.pool.start(), self.loop)
        log.info("worker runtime started: %s", ", ".join(repr(x.pool) for x in self.lanes.values()))

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; ``close()`` waits for it before closing the pool."""
        self.start()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return future

    async def idle(self, seconds: float) -> bool:
        """Sleep on the loop, cut short by close(); True once the runtime is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        return self.stopping

    def spawn_publisher(self, target: Callable[[], None]) -> None:
        """Run blocking publishing off the loop; ``close()`` waits for it."""

        def run() -> None:
            try:
                target()
            finally:
                with self._publishers_lock:
                    self._publishers.discard(thread)

        thread = threading.Thread(target=run, name="ses-tasks-publish", daemon=True)
        # Added and started under one lock: close() only ever sees started threads.
        with self._publishers_lock:
            self._publishers.add(thread)
            thread.start()

    def _join_publishers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            with self._publishers_lock:
                pending = list(self._publishers)
            if not pending:
                return
            pending[0].join(timeout=left)

    def wait_for_room(self, limit: int, timeout_s: float) -> bool:
        """Wait until fewer than ``limit`` submitted batches run; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = [f for f in list(self._running) if not f.done()]
            if len(running) < limit:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            concurrent.futures.wait(running, left, concurrent.futures.FIRST_COMPLETED)

    def run(self, coro: Coroutine[Any, Any, T], *, timeout_s: float | None = None) -> T:
        """Run ``coro`` on this process's loop and wait for its result (bounded)."""
        self.start()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        # On timeout the coroutine is not cancelled: a batch cut short mid-send would leave
        # sends unrecorded. It finishes on the loop; the caller stops waiting for it.
        return future.result(timeout=timeout_s or self.settings.task_timeout_s)

    def start_fleet_loops(self, publish: Callable[[BatchJob], None]) -> None:
        """Run the fleet's sweeper, dispatcher and scheduler loops here (each acts only as
        leader)."""
        self.start()
        if self._sweeper_task is None:
            sweeper = Sweeper(self, publish)
            self._sweeper_task = self._start_fleet_loop(sweeper.run_forever())
        if self._dispatcher_task is None:
            dispatcher = Dispatcher(self, publish)
            self._dispatcher_task = self._start_fleet_loop(dispatcher.run_forever())
        if self._scheduler_task is None:
            scheduler = Scheduler(self, publish)
            self._scheduler_task = self._start_fleet_loop(scheduler.run_forever())

    def _start_fleet_loop(self, coro: Coroutine[Any, Any, None]) -> concurrent.futures.Future[None]:
        async def tracked() -> None:
            task = asyncio.current_task()
            if task is not None:
                self._fleet_tasks.add(task)
            await coro

        return asyncio.run_coroutine_threadsafe(tracked(), self.loop)

    async def _stop_fleet_loops(self) -> None:
        """Let each loop end its round (what it took gets published), then cancel the ones
        still stuck (their handlers mark what they took due now) and wait for them."""
        tasks = [t for t in self._fleet_tasks if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=FLEET_STOP_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)

    async def stored_record(self, message_id: str) -> dict[str, Any]:
        """A message's record as a task result (``queued`` if there is none)."""
        raw = await self.redis.hgetall(self.store.keys.message(message_id))
        record = parse_message(message_id, raw)
        state = record.state.value if record else "queued"
        return {
            "message_id": message_id,
            "state": state,
            "ses_message_id": record.ses_message_id if record else None,
            "code": record.code if record else 0,
            "reason": record.reason if record else "",
        }

    def close(self) -> None:
        """QUIT every connection, close Redis, stop the loop. Idempotent."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        # Batches still running start no new chunk: they finish the sends in flight,
        # record them, and hand the rest back (the Celery tasks returned long ago, so a
        # warm shutdown does not wait for them).
        self.stopping = True

        self.loop.call_soon_threadsafe(self._stop_event.set)
        try:
            # The fleet loops end their round (a batch taken is published) and give up
            # their locks, so another process leads at once.
            asyncio.run_coroutine_threadsafe(self._stop_fleet_loops(), self.loop).result(
                timeout=FLEET_STOP_S + CLOSE_TIMEOUT_S + 1
            )
            # Let batches still sending finish and record, within the lease.
            _, late = concurrent.futures.wait(
                list(self._running), timeout=self.settings.claim_lease_s
            )
            if late:
                log.warning(
                    "%d batches still running after %.0f s at shutdown; the sweeper takes "
                    "them over once their lease runs out",
                    len(late),
                    self.settings.claim_lease_s,
                )
            # A batch's done callbacks (which start its follow-ups' publisher) run on the
            # loop just after its future wakes us: one loop turn later they have run.
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(timeout=5)
            # Follow-ups on their way to the broker: one publish may retry for ~11 s.
            self._join_publishers(FLEET_STOP_S)
        except Exception:  # pragma: no cover - the connections must still QUIT below
            log.warning("worker runtime: waiting for running work failed", exc_info=True)

        async def _close() -> None:
            try:
                await asyncio.gather(
                    *(lane.pool.close() for lane in self.lanes.values()), return_exceptions=True
                )
            finally:
                await self.redis.aclose()

        future = asyncio.run_coroutine_threadsafe(_close(), self.loop)
        try:
            future.result(timeout=CLOSE_TIMEOUT_S)
        except Exception:  # pragma: no cover - best effort at exit
            log.warning("worker runtime did not close cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        log.info("worker runtime closed: %r", self.pool)


_runtime: WorkerRuntime | None = None
_runtime_pid = -1
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, created on first use in this process (after fork)."""
    global _runtime, _runtime_pid
    with _runtime_lock:
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = WorkerRuntime(load_settings())
            _runtime_pid = os.getpid()
        runtime = _runtime
    runtime.start()
    return runtime


def shutdown_runtime() -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None and _runtime_pid == os.getpid():
            _runtime.close()
        _runtime = None
