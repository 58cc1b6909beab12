"""The fleet's scheduler: what was sent with ``send_at`` goes out when its time comes.

A single message sent with ``send_at`` is recorded ``queued`` (its record says when) with
its ledger entry due at ``send_at``, and nothing is published. A scheduled campaign is
stored whole; the dispatcher hands out none of its batches before its ``send_at``. Both
are written to one index, a sorted set by due time (``Keys.scheduled``), and the scheduler
waits for the earliest: it sleeps until then (a producer scheduling something earlier
wakes it through a kick list), takes the single messages that are due and publishes
them, and wakes the dispatcher for the campaigns that may start. No Celery ETA or
countdown is involved, so a scheduled send survives any worker restart: the state is in
Redis, and the next process to lead takes over at once (a stopping leader gives up its
lock) or within the lock's TTL (a killed one).

The index is for punctuality, not safety: the ledger entry of a message is due at its
``send_at``, so the sweeper publishes it if the index entry was lost, and the dispatcher
polls campaigns every second anyway. A copy published twice is harmless (claims are
idempotent). One worker process schedules at a time (``leadership``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ses_tasks.keys import campaign_of
from ses_tasks.store.tracking import START_PREFIX, LedgerEntry
from ses_tasks.worker import leadership
from ses_tasks.worker.delivery import STORE_ERRORS, BatchJob

if TYPE_CHECKING:
    from ses_tasks.worker.runtime import WorkerRuntime

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

LOCK_TTL_MS = 3000
#: The longest the leader waits before looking at the index again (and renewing its lock).
MAX_WAIT_S = 1.0
#: Below this wait the leader sleeps to the due time on its own clock (checking the kick
#: list every ``KICK_POLL_S``) instead of blocking on the kick list (whose server-side
#: timeout is coarse: whole seconds before Redis 6, about 0.1 s after).
PRECISE_BELOW_S = 1.25
KICK_POLL_S = 0.1
#: Index members handled per step.
TAKE_LIMIT = 200


class Scheduler:
    def __init__(self, rt: WorkerRuntime, publish: Callable[[BatchJob], None]) -> None:
        self.rt = rt
        self.publish = publish
        self.published = 0
        self.started_campaigns = 0

    async def run_forever(self) -> None:
        """Schedule until the runtime stops; a step in progress finishes its publishes."""
        while not self.rt.stopping:
            try:
                if await self._lead():
                    await self._wait(await self.run_due())
                else:
                    await self.rt.idle(MAX_WAIT_S)
            except STORE_ERRORS as exc:
                log.warning("scheduler: Redis error (%s); next step in %.0f s", exc, MAX_WAIT_S)
                await self.rt.idle(MAX_WAIT_S)
            except Exception:  # scheduled mail must outlive any bug in one step
                log.exception("scheduler step failed")
                await self.rt.idle(MAX_WAIT_S)
        await leadership.release(self.rt.redis, self.rt.store.keys.scheduler_lock(), self.rt.token)

    async def _lead(self) -> bool:
        return await leadership.hold(
            self.rt.redis, self.rt.store.keys.scheduler_lock(), self.rt.token, LOCK_TTL_MS
        )

    async def run_due(self) -> float | None:
        """Publish what is due; returns seconds until the next due time (None: nothing)."""
        while True:
            next_in, members = await self.rt.store.schedule_due(limit=TAKE_LIMIT)
            if not members:
                return next_in
            await self._handle(members)
            # Look again (more may be due; the next due time is fresh) while we lead.
            if not await self._lead():
                return None

    async def _handle(self, members: list[str]) -> None:
        store = self.rt.store
        done: list[str] = []
        singles: dict[str, list[str]] = {}
        starts = [m for m in members if m.startswith(START_PREFIX)]
        for member in members:
            if member.startswith(START_PREFIX):
                continue
            try:
                singles.setdefault(campaign_of(member), []).append(member)
            except ValueError:
                log.warning("scheduler: dropping %r, not a message id", member)
                done.append(member)
        if starts:
            # The dispatcher checks each campaign's send_at itself: this only wakes it now
            # instead of at its next poll.
            await store.kick_dispatcher()
            self.started_campaigns += len(starts)
            log.info("scheduled campaigns may start: %s", ", ".join(starts))
            done += starts
        for campaign_id, ids in singles.items():
            _, entries, gone = await store.take_scheduled(campaign_id, ids)
            try:
                failed = await asyncio.to_thread(self._publish_all, campaign_id, entries)
            except asyncio.CancelledError:  # shutdown: the sweeper publishes them now
                ids_taken = [e.batch_id for e in entries]
                await asyncio.shield(store.mark_due_now(campaign_id, ids_taken))
                raise
            if failed:  # due now: the sweeper publishes them at its next pass
                await store.mark_due_now(campaign_id, failed)
            self.published += len(entries) - len(failed)
            if len(entries) > len(failed):
                log.info(
                    "scheduler: published %d scheduled messages of %s",
                    len(entries) - len(failed),
                    campaign_id,
                )
            done += gone + [e.batch_id for e in entries]
        await store.unschedule(done)

    def _publish_all(self, campaign_id: str, entries: list[LedgerEntry]) -> list[str]:
        failed = []
        for entry in entries:
            job = BatchJob.from_payload(campaign_id, entry.batch_id, entry.payload)
            try:
                self.publish(job)
            except Exception as exc:
                log.warning("scheduler: %s not published (%s)", entry.batch_id, exc)
                failed.append(entry.batch_id)
        return failed

    async def _wait(self, next_in: float | None) -> None:
        """Until the next due time (at most ``MAX_WAIT_S``), or until something is
        scheduled (a push on the kick list)."""
        key = self.rt.store.keys.schedule_kick()
        redis = self.rt.redis
        if next_in is not None and next_in <= 0:
            return
        if (next_in is None or next_in >= PRECISE_BELOW_S) and (
            self.rt.settings.redis_socket_timeout_s > MAX_WAIT_S + 0.5
        ):
            await redis.blpop([key], timeout=int(MAX_WAIT_S))
            return
        wait = MAX_WAIT_S if next_in is None else min(next_in, MAX_WAIT_S)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if await redis.lpop(key) or await self.rt.idle(min(KICK_POLL_S, left)):
                return
