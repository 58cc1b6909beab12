"""The fleet's dispatcher: stored batches go to the broker a few at a time, fairly.

Producers store a campaign's batches in Redis (the ledger plus a backlog); the broker holds
only what the fleet can run now, so its memory is bounded whatever the campaign size, a
pause or cancel takes effect within a batch, and a campaign started behind a million-row
newsletter is next in line, not 20 hours away.

Each round counts every campaign's batches in flight, sizes the window from the workers'
heartbeats (``batches_per_process`` each, or ``DISPATCH_WINDOW``), and gives each free slot
to the campaign furthest below its weighted share (max-min fairness, ``allocate``). It also
hands each running campaign's share of the rate to the limiter, so a campaign's single
batch gets its share of the sends while another campaign's batches fill the fleet.

One worker process dispatches at a time (``leadership``); every process runs the loop and
heartbeats, so the fleet needs no extra service. A round is woken by a push on the kick
list (a batch settled, a producer stored batches) or by a short poll. Crash safety comes
from the ledger: a taken batch is due for the sweeper ``DISPATCH_TIMEOUT_S`` after it was
taken unless a worker claims it, so a dispatcher killed between take and publish loses
nothing, and a copy published twice is harmless (claims are idempotent).

A campaign scheduled with ``send_at`` takes no slot before then (its dispatch script
refuses, by the Redis server's clock); the scheduler (``scheduler.py``) kicks the
dispatcher at that time, so it starts within a round, not at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from celery.signals import worker_init

from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.states import CampaignState
from ses_tasks.store.tracking import DispatchReply
from ses_tasks.worker import heartbeat, leadership
from ses_tasks.worker.delivery import STORE_ERRORS, BatchJob

if TYPE_CHECKING:
    from ses_tasks.worker.runtime import WorkerRuntime

__all__ = ["Dispatcher", "allocate", "rate_shares"]

log = logging.getLogger(__name__)

#: A round runs at least this often, kicked or not (a lost kick costs at most this).
POLL_S = 1
#: Workers heartbeat this often; one silent for three beats no longer counts.
HEARTBEAT_S = 2.0
#: How often the kick list is polled when the Redis socket timeout is too short to block.
KICK_POLL_S = 0.1
LOCK_TTL_MS = 3000
#: Campaigns that take batches (a cancelled one takes them to record them cancelled).
TAKING = frozenset({CampaignState.ENQUEUEING, CampaignState.RUNNING, CampaignState.CANCELLED})
#: Campaigns whose batches send mail, and so share the rate.
SENDING = frozenset({CampaignState.ENQUEUEING, CampaignState.RUNNING})

# The heartbeat names the Celery node its process belongs to.
worker_init.connect(heartbeat.remember_node, weak=False)


def allocate(campaigns: Sequence[DispatchReply], window: int) -> dict[str, int]:
    """Free slots of the window per campaign: weighted max-min fairness.

    Each slot goes to the campaign with the fewest batches in flight per unit of weight
    (ties: the order given, oldest first), so weights 3:1 hold about 3:1 of the window
    while both have work. A campaign with nothing in flight gets one batch even when the
    window is full; the dispatcher then asks a batch of the campaign most over its share
    to hand its rest back (``Dispatcher._make_room``), so the newcomer starts within a
    chunk instead of waiting for a batch to end. Its share of the rate then comes from the
    limiter at once.
    """
    free = window - sum(c.in_flight for c in campaigns)
    out = {c.campaign_id: 0 for c in campaigns}
    heap = [
        ((c.in_flight + 1) / c.weight, order, c)
        for order, c in enumerate(campaigns)
        if c.backlog > 0 and c.state in TAKING
    ]
    heapq.heapify(heap)
    while free > 0 and heap:
        _, order, c = heapq.heappop(heap)
        out[c.campaign_id] += 1
        free -= 1
        if out[c.campaign_id] < c.backlog:
            heapq.heappush(heap, ((c.in_flight + out[c.campaign_id] + 1) / c.weight, order, c))
    for _, _, c in heap:  # a newcomer starts now, not when the window frees a slot
        if c.in_flight == 0 and out[c.campaign_id] == 0 and c.state in SENDING:
            out[c.campaign_id] = 1
    return out


def rate_shares(campaigns: Sequence[DispatchReply]) -> dict[str, dict[str, float]]:
    """Per profile, each sending campaign's share of that profile's rate, by weight.

    Only campaigns with batches in flight count (one still waiting for its first slot
    holds nobody back); a profile with one sending campaign has no split ({}).
    """
    by_profile: dict[str, list[DispatchReply]] = {}
    for c in campaigns:
        by_profile.setdefault(c.profile, [])
        if c.state in SENDING and c.in_flight:
            by_profile[c.profile].append(c)
    out: dict[str, dict[str, float]] = {}
    for profile, sending in by_profile.items():
        total = sum(c.weight for c in sending)
        split = len(sending) > 1
        out[profile] = {c.campaign_id: c.weight / total for c in sending} if split else {}
    return out


class Dispatcher:
    def __init__(self, rt: WorkerRuntime, publish: Callable[[BatchJob], None]) -> None:
        self.rt = rt
        self.publish = publish
        self.settings = rt.settings
        self.dispatched = 0
        self.shares: dict[str, dict[str, float]] = {}
        self._next_beat = 0.0

    async def run_forever(self) -> None:
        """Dispatch until the runtime stops; a round in progress finishes its publishes
        (a batch taken and never published would wait out DISPATCH_TIMEOUT_S)."""
        while not self.rt.stopping:
            try:
                await self._heartbeat()
                if await leadership.hold(
                    self.rt.redis, self.rt.store.keys.dispatcher_lock(), self.rt.token, LOCK_TTL_MS
                ):
                    await self.round()
                    await self._wait_for_kick()
                else:
                    await self.rt.idle(HEARTBEAT_S / 2)
            except STORE_ERRORS as exc:
                log.warning("dispatcher: Redis error (%s); next round in %.0f s", exc, POLL_S)
                await self.rt.idle(POLL_S)
            except Exception:  # the fleet's only dispatcher must outlive any bug in a round
                log.exception("dispatch round failed")
                await self.rt.idle(POLL_S)
        await leadership.release(self.rt.redis, self.rt.store.keys.dispatcher_lock(), self.rt.token)
        with contextlib.suppress(*STORE_ERRORS):  # the window shrinks now, not at expiry
            await self.rt.redis.zrem(self.rt.store.keys.workers(), self._member())
            for queue in self.rt.consumed_queues:
                await self.rt.redis.zrem(self.rt.store.keys.consumers(queue), self.rt.token)
            keys = self.rt.store.keys
            await self.rt.redis.zrem(keys.workers_seen(), self.rt.token)
            await self.rt.redis.delete(keys.worker_info(self.rt.token))

    async def _still_leader(self) -> bool:
        """Renew the lock before each take: a slow round never overlaps another leader's."""
        return await leadership.hold(
            self.rt.redis, self.rt.store.keys.dispatcher_lock(), self.rt.token, LOCK_TTL_MS
        )

    async def _wait_for_kick(self) -> None:
        key = self.rt.store.keys.dispatch_kick()
        if self.settings.redis_socket_timeout_s > POLL_S + 0.5:
            # Whole seconds: Redis before 6 takes no fractional timeout.
            await self.rt.redis.blpop([key], timeout=POLL_S)
            return
        # A socket timeout too short to block on: poll instead.
        deadline = time.monotonic() + POLL_S
        while time.monotonic() < deadline and not await self.rt.redis.lpop(key):
            if await self.rt.idle(KICK_POLL_S):
                return

    async def _heartbeat(self) -> None:
        now = time.time()
        if now < self._next_beat:
            return
        self._next_beat = now + HEARTBEAT_S
        deadline = int((now + 3 * HEARTBEAT_S) * 1000)
        keys = self.rt.store.keys
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.workers(), {self._member(): deadline})
            for queue in self.rt.consumed_queues:
                pipe.zremrangebyscore(keys.consumers(queue), "-inf", int(now * 1000))
                pipe.zadd(keys.consumers(queue), {self.rt.token: deadline})
            # For people (the dashboard): queues and pools, kept a while after silence.
            keep_ms = int(heartbeat.KEEP_S * 1000)
            seen = keys.workers_seen()
            pipe.zremrangebyscore(seen, "-inf", int(now * 1000) - keep_ms)
            pipe.zadd(seen, {self.rt.token: int(now * 1000)})
            pipe.pexpire(seen, keep_ms)
            info = heartbeat.describe(self.rt, now)
            pipe.set(keys.worker_info(self.rt.token), info, px=keep_ms)
            await pipe.execute()

    def _member(self) -> str:
        return f"{self.rt.token}|{self.rt.bulk_capacity}"

    async def window(self) -> int:
        """Batches the broker may hold for the fleet: what live workers run at once."""
        if self.settings.dispatch_window:
            return self.settings.dispatch_window
        key = self.rt.store.keys.workers()
        await self.rt.redis.zremrangebyscore(key, "-inf", int(time.time() * 1000))
        members = await self.rt.redis.zrange(key, 0, -1)
        total = 0
        for m in members:
            text = m.decode() if isinstance(m, bytes) else str(m)
            total += int(text.rpartition("|")[2] or 1)
        return max(1, total)

    async def round(self) -> int:
        """Count, allocate, take and publish; returns batches handed to the broker."""
        store = self.rt.store
        timeout_s = self.settings.dispatch_timeout
        ids = [c for c in await store.active_campaigns() if c != TRANSACTIONAL]
        campaigns = list(
            await asyncio.gather(*(store.dispatch(c, 0, unclaimed_after_s=timeout_s) for c in ids))
        )
        spent = await self._quota_spent(
            {c.profile for c in campaigns if c.backlog and not c.starts_in_s}
        )
        # A profile whose 24-hour quota is used up gets nothing: its batches would only
        # turn into deferred follow-ups outside the window. A scheduled campaign gets
        # nothing before its send_at (the script would take nothing anyway).
        candidates = [
            replace(c, backlog=0) if c.profile in spent or c.starts_in_s > 0 else c
            for c in campaigns
        ]
        window = await self.window()
        grants = allocate(candidates, window)
        await self._make_room(campaigns, grants, window)
        handed = 0
        after = []
        for c in campaigns:
            if grants[c.campaign_id] > 0 and await self._still_leader():
                reply = await store.dispatch(
                    c.campaign_id, grants[c.campaign_id], unclaimed_after_s=timeout_s
                )
                handed += await self._publish(c.campaign_id, reply)
                c = reply
            after.append(c)
        await self._share_rate(after)
        self.dispatched += handed
        return handed

    async def _make_room(
        self, campaigns: Sequence[DispatchReply], grants: dict[str, int], window: int
    ) -> None:
        """Newcomers granted past a full window: ask the campaigns most over their share
        to hand back one batch each, so the newcomer's batch finds a free worker now."""
        over = sum(grants.values()) - max(0, window - sum(c.in_flight for c in campaigns))
        if over <= 0:
            return
        running = sorted(
            (
                c
                for c in campaigns
                if c.state in SENDING and c.in_flight > 1 and not grants[c.campaign_id]
            ),
            key=lambda c: c.in_flight / c.weight,
            reverse=True,
        )
        for c in running[:over]:
            lane = self.rt.lanes.get(c.profile)
            if lane is not None:
                await lane.limiter.request_yield(c.campaign_id)

    async def _quota_spent(self, profiles: set[str]) -> set[str]:
        spent = set()
        for profile in profiles:
            lane = self.rt.lanes.get(profile)
            if lane is None:
                continue
            status = await lane.quota.status()
            until = status.exhausted_until
            if status.remaining == 0 or (until is not None and until > time.time()):
                spent.add(profile)
        return spent

    async def _share_rate(self, campaigns: Sequence[DispatchReply]) -> None:
        shares = rate_shares(campaigns)
        for profile in set(shares) | set(self.shares):
            split = shares.get(profile, {})
            # Refreshed each round while split (the limiter ignores stale shares).
            if (split or self.shares.get(profile)) and profile in self.rt.lanes:
                await self.rt.lanes[profile].limiter.set_shares(split)
        self.shares = shares

    async def _publish(self, campaign_id: str, reply: DispatchReply) -> int:
        jobs = [BatchJob.from_payload(campaign_id, e.batch_id, e.payload) for e in reply.taken]
        published: list[str] = []
        try:
            failed = await asyncio.to_thread(self._publish_all, jobs, published)
        except asyncio.CancelledError:
            # Cut short (shutdown): the batches not yet handed to the broker are due now
            # for the sweeper instead of waiting out DISPATCH_TIMEOUT_S.
            rest = [j.batch_id for j in jobs if j.batch_id not in set(published)]
            await asyncio.shield(self.rt.store.mark_due_now(campaign_id, rest))
            raise
        if failed:  # due now: the sweeper republishes them at its next pass
            log.warning("dispatcher: %d batches of %s not published", len(failed), campaign_id)
            await self.rt.store.mark_due_now(campaign_id, failed)
        return len(jobs) - len(failed)

    def _publish_all(self, jobs: list[BatchJob], published: list[str]) -> list[str]:
        failed = []
        for job in jobs:
            try:
                self.publish(job)
                published.append(job.batch_id)
            except Exception as exc:
                log.warning("dispatcher: batch %s not published (%s)", job.batch_id, exc)
                failed.append(job.batch_id)
        return failed
