"""The fleet's backstop: republish ledger entries that nobody settled in time.

A batch stays in its campaign's ledger from before it is published until the script that
records its last outcome removes it. Its due time is pushed out while a worker holds it
(the lease) and set to "now" when a publish fails. An entry past due therefore means its
publish was lost, its worker died, or its task was acknowledged without finishing; the
sweeper publishes it again through the same claim path, so "nothing stays stuck" holds by
construction. One worker process of the fleet sweeps at a time (a Redis lock with a TTL);
every worker process runs the loop, so the fleet needs no extra service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ses_tasks.worker import leadership
from ses_tasks.worker.delivery import STORE_ERRORS, BatchJob

if TYPE_CHECKING:
    from ses_tasks.worker.runtime import WorkerRuntime

__all__ = ["Sweeper"]


log = logging.getLogger(__name__)

#: Ledger entries taken per campaign per pass.
SWEEP_LIMIT = 200


class Sweeper:
    def __init__(self, rt: WorkerRuntime, publish: Callable[[BatchJob], None]) -> None:
        self.rt = rt
        self.publish = publish
        self.interval_s = rt.settings.sweep_interval_s
        self.lock_ttl_ms = int(self.interval_s * 3 * 1000)
        self.swept = 0

    async def run_forever(self) -> None:
        """Sweep until the runtime stops; a pass in progress finishes its publishes."""
        while not self.rt.stopping:
            try:
                if await self.lead():
                    await self.sweep_once()
            except STORE_ERRORS as exc:
                log.warning("sweeper: Redis error (%s); next pass in %.0f s", exc, self.interval_s)
            except Exception:  # the backstop must outlive any bug in one pass
                log.exception("sweeper pass failed")
            await self.rt.idle(self.interval_s)
        await leadership.release(self.rt.redis, self.rt.store.keys.sweeper_lock(), self.rt.token)

    async def lead(self) -> bool:
        """Take or keep the fleet's sweeper lock."""
        return await leadership.hold(
            self.rt.redis, self.rt.store.keys.sweeper_lock(), self.rt.token, self.lock_ttl_ms
        )

    async def sweep_once(self) -> int:
        """One pass over every active campaign; returns batches republished."""
        store = self.rt.store
        republished = 0
        for campaign_id in await store.active_campaigns():
            if self.rt.stopping:  # take nothing we might not get to publish
                break
            _, entries = await store.take_due(campaign_id, limit=SWEEP_LIMIT)
            failed: list[str] = []
            done = 0
            try:
                for entry in entries:
                    job = BatchJob.from_payload(campaign_id, entry.batch_id, entry.payload)
                    try:
                        await asyncio.to_thread(self.publish, job)
                        republished += 1
                    except Exception as exc:
                        log.warning("sweeper: batch %s not published (%s)", entry.batch_id, exc)
                        failed.append(entry.batch_id)
                    done += 1
            except asyncio.CancelledError:
                # Cut short (shutdown): what was taken and not published is due now, not
                # after REDELIVER_AFTER_S, so the next sweeper publishes it at once.
                rest = failed + [e.batch_id for e in entries[done:]]
                await asyncio.shield(store.mark_due_now(campaign_id, rest))
                raise
            if failed:
                await store.mark_due_now(campaign_id, failed)
            if entries:
                log.warning(
                    "sweeper: republished %d batches of campaign %s that nobody settled",
                    len(entries) - len(failed),
                    campaign_id,
                )
            elif await store.retire_if_settled(campaign_id):
                log.debug("sweeper: campaign %s settled", campaign_id)
        self.swept += republished
        return republished
