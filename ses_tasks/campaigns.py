"""Campaigns from the producer's side: create, stream recipients into batches, control.

A campaign's template is validated and stored once; recipients are streamed from a file or
an iterable and enqueued in batches of ``batch_size`` rows, each task carrying only
``[seq, email, variables, failures]`` rows. Bad rows are recorded ``failed`` with their
reason as they are met, so the campaign's counters always cover every row.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from .app import BATCH_TASK, bulk_queue
from .config import Settings
from .errors import CampaignError, SesTasksError
from .message import CampaignTemplate
from .recipients import Recipient, RowError, iter_recipients
from .states import CampaignState, MessageState
from .tracking import CampaignStatus, MessageRecord, StatusStore, Transition

__all__ = ["CampaignControl", "CampaignProducer", "new_campaign_id"]

ProgressCallback = Callable[[int], None]


def new_campaign_id() -> str:
    return time.strftime("c%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class CampaignProducer:
    def __init__(self, settings: Settings, store: StatusStore, celery_app: Celery) -> None:
        self.settings = settings
        self.store = store
        self.app = celery_app

    def send(
        self,
        template: CampaignTemplate,
        recipients: str | Path | Iterable[Any],
        *,
        campaign_id: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> CampaignStatus:
        """Create the campaign and enqueue every recipient; returns the status after enqueue."""
        rows = iter_recipients(recipients)  # file header errors surface here, before creation
        campaign_id = campaign_id or new_campaign_id()
        stored = template.to_dict()
        self.store.create_campaign(
            campaign_id,
            template=stored,
            meta={
                "from": stored["from"],
                "subject": stored["subject"][:200],
                "mode": self.settings.endpoint.mode.value,
            },
        )
        self._enqueue(campaign_id, rows, start_seq=0, progress=progress)
        return self.store.finish_enqueue(campaign_id)

    def _enqueue(
        self,
        campaign_id: str,
        rows: Iterator[Recipient | RowError] | Iterable[Recipient | RowError],
        *,
        start_seq: int,
        progress: ProgressCallback | None,
        requeue: bool = False,
    ) -> int:
        size = self.settings.batch_size
        queue = bulk_queue(self.settings.endpoint.mode)
        seq = start_seq
        batch: list[list[Any]] = []
        bad: list[Transition] = []
        for row in rows:
            if isinstance(row, RowError):
                bad.append(
                    Transition(
                        f"{campaign_id}.{seq}",
                        MessageState.FAILED,
                        0,
                        row.reason,
                        row=[seq, row.email, {}, 0],
                    )
                )
            else:
                batch.append([seq, row.email, row.variables, 0])
            seq += 1
            if len(batch) >= size:
                self._publish(campaign_id, batch, queue, requeue)
                if progress:
                    progress(len(batch))
                batch = []
            if len(bad) >= size:
                self._record_bad(campaign_id, bad, progress)
                bad = []
        if batch:
            self._publish(campaign_id, batch, queue, requeue)
            if progress:
                progress(len(batch))
        if bad:
            self._record_bad(campaign_id, bad, progress)
        return seq - start_seq

    def _publish(self, campaign_id: str, batch: list[list[Any]], queue: str, requeue: bool) -> None:
        if requeue:
            self.store.finish(
                campaign_id,
                [Transition(f"{campaign_id}.{item[0]}", MessageState.QUEUED) for item in batch],
                requeue=True,
            )
        else:
            self.store.add_queued(campaign_id, len(batch))
        try:
            self.app.send_task(BATCH_TASK, args=(campaign_id, batch), queue=queue)
        except Exception as exc:
            reason = f"could not enqueue: {type(exc).__name__}: {exc}"
            self.store.finish(
                campaign_id,
                [
                    Transition(f"{campaign_id}.{i[0]}", MessageState.FAILED, 0, reason, row=i)
                    for i in batch
                ],
            )
            raise SesTasksError(f"campaign {campaign_id}: broker refused a batch: {exc}") from exc

    def _record_bad(
        self, campaign_id: str, bad: list[Transition], progress: ProgressCallback | None
    ) -> None:
        self.store.add_queued(campaign_id, len(bad))
        self.store.finish(campaign_id, bad)
        if progress:
            progress(len(bad))


class CampaignControl:
    """Pause, resume, cancel and retry-failed, for the CLI and the Python API."""

    def __init__(self, producer: CampaignProducer) -> None:
        self.producer = producer
        self.store = producer.store

    def pause(self, campaign_id: str) -> bool:
        return self.store.pause(campaign_id)

    def resume(self, campaign_id: str) -> int:
        """Resume and hand parked batches back to the broker; returns messages re-enqueued."""
        parked = self.store.resume(campaign_id)
        queue = bulk_queue(self.producer.settings.endpoint.mode)
        count = 0
        for payload in parked:
            self.producer.app.send_task(
                BATCH_TASK, args=(campaign_id, payload["items"]), queue=queue
            )
            count += len(payload["items"])
        return count

    def cancel(self, campaign_id: str) -> int:
        return self.store.cancel(campaign_id)

    def retry_failed(self, campaign_id: str, *, include_unknown: bool = False) -> int:
        """Requeue every ``failed`` message (and ``unknown`` if asked) with a fresh budget."""
        status = self.store.campaign_status(campaign_id)
        if status.state is CampaignState.CANCELLED:
            raise CampaignError(f"campaign {campaign_id!r} is cancelled")
        states = {MessageState.FAILED} | ({MessageState.UNKNOWN} if include_unknown else set())
        rows = [
            r for r in self.store.not_sent(campaign_id) if r.state in states and r.row and r.row[1]
        ]
        if not rows:
            return 0
        producer = self.producer
        size = producer.settings.batch_size
        queue = bulk_queue(producer.settings.endpoint.mode)
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            batch = [[int(r.row[0]), r.row[1], r.row[2] or {}, 0] for r in chunk]
            producer._publish(campaign_id, batch, queue, requeue=True)
        return len(rows)

    def failures(self, campaign_id: str) -> Iterator[MessageRecord]:
        self.store.campaign_status(campaign_id)
        return self.store.not_sent(campaign_id)
