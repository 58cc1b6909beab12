"""Campaigns from the producer's side: create, stream recipients into batches, control.

A campaign's template is validated and stored once; recipients are streamed from a file or
an iterable and stored in batches of ``batch_size`` rows (``[seq, email, variables,
attempts]``) in Redis. The producer publishes nothing: the fleet's dispatcher hands batches
to the broker as workers free up, sharing the rate between campaigns by weight. Bad rows
are recorded ``failed`` with their reason as they are met, so the campaign's counters
always cover every row.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from redis.exceptions import RedisError

from ses_tasks.config import Settings
from ses_tasks.errors import CampaignError, ConfigurationError, SesTasksError, ValidationError
from ses_tasks.message.spec import CampaignTemplate
from ses_tasks.produce.recipients import Recipient, RowError, iter_recipients
from ses_tasks.queue.publish import publish_job
from ses_tasks.states import CampaignState, MessageState
from ses_tasks.store.tracking import (
    CampaignStatus,
    LedgerEntry,
    MessageRecord,
    Settlement,
    StatusStore,
    Transition,
)
from ses_tasks.worker.delivery import BatchItem, BatchJob

__all__ = ["CampaignControl", "CampaignProducer", "new_campaign_id"]

ProgressCallback = Callable[[int], None]
#: The dispatcher is woken at most this often while a campaign is being stored.
KICK_EVERY_S = 0.2
MAX_WEIGHT = 1000.0


def check_weight(weight: float) -> float:
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise ValidationError("weight", f"must be a number, not {weight!r}")
    if not 0 < weight <= MAX_WEIGHT:
        raise ValidationError(
            "weight", f"must be above 0 and at most {MAX_WEIGHT:g}, not {weight!r}"
        )
    return float(weight)


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
        resume: bool = False,
        weight: float = 1.0,
        profile: str = "",
        send_at_ms: int | None = None,
        metadata: str = "",
    ) -> CampaignStatus:
        """Create the campaign and enqueue every recipient; returns the status after enqueue.

        With ``resume=True`` an interrupted enqueue of ``campaign_id`` (producer killed,
        broker down) continues from where it stopped, given the same template and recipients:
        rows already enqueued are skipped, and the last batch whose fate is unknown is
        published again (workers skip whatever of it was already sent). A resumed enqueue
        keeps the schedule the campaign was created with.

        ``send_at_ms`` (Unix ms, from ``options.parse_send_at``): everything is stored now,
        and the dispatcher hands out no batch before then.
        """
        weight = check_weight(weight)
        sender = self._sender(profile)
        rows = iter_recipients(recipients)  # file header errors surface here, before creation
        stored = template.to_dict()
        if resume:
            if campaign_id is None:
                raise CampaignError("resume needs the campaign id")
            published, counted = self._resume_point(campaign_id, stored)
            created = self.store.campaign_status(campaign_id)
            profile = created.meta.get("profile", "")
            send_at_ms = int(created.send_at * 1000) if created.send_at else None
        else:
            campaign_id = campaign_id or new_campaign_id()
            self.store.create_campaign(
                campaign_id,
                template=stored,
                meta={
                    "from": stored["from"],
                    "subject": stored["subject"][:200],
                    "mode": sender.endpoint.mode.value,
                    "weight": repr(weight),
                    **({"profile": profile} if profile else {}),
                    **({"metadata": metadata} if metadata else {}),  # JSON, for events
                },
                send_at_ms=send_at_ms,
            )
            published = counted = 0
        storing = _Storing(self.store, campaign_id, profile, counted, progress)
        storing.ttl_s = self.store.ttl_for(send_at_ms)
        try:
            storing.run(rows, self.settings.batch_size, published_upto=published)
        except RedisError as exc:
            raise SesTasksError(
                f"campaign {campaign_id}: the status store failed while storing recipients "
                f"({type(exc).__name__}: {exc}); nothing is lost: run `ses-tasks campaign send "
                f"--resume --id {campaign_id} ...` with the same options to continue"
            ) from exc
        status = self.store.finish_enqueue(campaign_id)
        storing.kick(force=True)
        return status

    def _resume_point(self, campaign_id: str, template: dict[str, Any]) -> tuple[int, int]:
        status = self.store.campaign_status(campaign_id)
        if status.enqueued_all:
            raise CampaignError(f"campaign {campaign_id!r} is already fully enqueued")
        if self.store.template(campaign_id) != template:
            raise CampaignError(
                f"campaign {campaign_id!r} was created with another template; resume needs "
                "the same subject, bodies and options"
            )
        return self.store.enqueued_upto(campaign_id), status.total

    def _sender(self, profile: str) -> Settings:
        try:
            return self.settings.for_profile(profile)
        except ConfigurationError as exc:
            raise ValidationError("profile", exc.problem) from None

    def publish(self, campaign_id: str, entries: Sequence[LedgerEntry]) -> None:
        """Publish ledger entries; one that fails is left due for the sweeper."""
        failed = []
        for entry in entries:
            job = BatchJob.from_payload(campaign_id, entry.batch_id, entry.payload)
            try:
                publish_job(self.app, self.settings.endpoint.mode, job, entry.delay_s)
            except Exception:
                failed.append(entry.batch_id)
        if failed:
            self.store.mark_due_now(campaign_id, failed)
            raise SesTasksError(
                f"campaign {campaign_id}: the broker refused {len(failed)} batches; they are "
                "kept and the workers' sweeper publishes them when the broker is back"
            )

    def requeue(self, campaign_id: str, batch: list[BatchItem]) -> None:
        """Put final messages (failed, unknown) back to queued and publish them again."""
        profile = self.store.campaign_status(campaign_id).meta.get("profile", "")
        entry = LedgerEntry(
            f"q{batch[0].seq}-{secrets.token_hex(4)}",
            BatchJob(campaign_id, tuple(batch), profile=profile).payload(),
        )
        self.store.finish(
            campaign_id,
            [Transition(f"{campaign_id}.{item.seq}", MessageState.QUEUED) for item in batch],
            requeue=True,
            settle=Settlement(follow_ups=[entry]),
        )
        self.publish(campaign_id, [entry])


class _Storing:
    """One ``send`` call's storing of rows, a batch at a time (one per call: thread-safe)."""

    def __init__(
        self,
        store: StatusStore,
        campaign_id: str,
        profile: str,
        counted_upto: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.store = store
        self.campaign_id = campaign_id
        self.profile = profile
        #: Rows below this are already counted (a resumed run does not count them again).
        self.counted_upto = counted_upto
        self.progress = progress
        self.last_kick = 0.0
        #: How long stored batches are kept (longer for a scheduled campaign).
        self.ttl_s = store.retention_s

    def run(self, rows: Iterable[Recipient | RowError], size: int, *, published_upto: int) -> int:
        """Store, count and advance the watermark, a batch at a time.

        Every row below the watermark is stored (good rows) or recorded (bad rows), so an
        interrupted run resumes exactly.
        """
        campaign_id = self.campaign_id
        seq = 0
        batch: list[BatchItem] = []
        bad: list[Transition] = []
        for row in rows:
            if seq >= published_upto:
                if isinstance(row, Recipient):
                    batch.append(BatchItem(seq, row.email, row.variables))
                else:  # recorded again on resume (idempotent); counted once, below
                    bad.append(
                        Transition(
                            f"{campaign_id}.{seq}",
                            MessageState.FAILED,
                            0,
                            row.reason,
                            row=[seq, row.email, {}, 0],
                        )
                    )
            seq += 1
            if len(batch) >= size or len(bad) >= size:
                self.flush(batch, bad, seq)
                batch, bad = [], []
        if batch or bad or seq > published_upto:
            self.flush(batch, bad, seq)
        return seq

    def flush(self, batch: list[BatchItem], bad: list[Transition], seq_end: int) -> None:
        """Store one batch for the dispatcher and advance the watermark, in one step."""
        store, campaign_id = self.store, self.campaign_id
        new = sum(1 for item in batch if int(item.seq) >= self.counted_upto) + sum(
            1 for t in bad if int(t.message_id.rsplit(".", 1)[1]) >= self.counted_upto
        )
        pipe = store.redis.pipeline(transaction=True)
        if new:
            store.add_queued(campaign_id, new, pipe)
        if batch:
            job = BatchJob(campaign_id, tuple(batch), f"b{batch[0].seq}", profile=self.profile)
            entry = LedgerEntry(job.batch_id, job.payload())
            store.store_batch(campaign_id, entry, int(batch[0].seq), pipe, ttl_s=self.ttl_s)
        if not bad:
            store.set_enqueued_upto(campaign_id, seq_end, pipe)
        pipe.execute()
        if bad:  # recorded, then counted as enqueued (recording again on resume is harmless)
            store.finish(campaign_id, bad)
            store.set_enqueued_upto(campaign_id, seq_end)
        if batch:
            self.kick()
        if self.progress:
            self.progress(len(batch) + len(bad))

    def kick(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_kick >= KICK_EVERY_S:
            self.last_kick = now
            with contextlib.suppress(Exception):  # the dispatcher also polls
                self.store.kick_dispatcher(self.campaign_id)


class CampaignControl:
    """Pause, resume, cancel and retry-failed, for the CLI and the Python API."""

    def __init__(self, producer: CampaignProducer) -> None:
        self.producer = producer
        self.store = producer.store

    def pause(self, campaign_id: str) -> bool:
        return self.store.pause(campaign_id)

    def resume(self, campaign_id: str) -> int:
        """Resume and hand parked batches back to the broker; returns messages re-enqueued.

        Batches never handed out stay stored; the dispatcher resumes taking them.
        """
        entries = self.store.resume(campaign_id)
        self.producer.publish(campaign_id, entries)
        with contextlib.suppress(Exception):
            self.store.kick_dispatcher()
        return sum(len(e.payload["items"]) for e in entries)

    def cancel(self, campaign_id: str) -> int:
        cancelled = self.store.cancel(campaign_id)
        with contextlib.suppress(Exception):  # stored batches are taken to record them
            self.store.kick_dispatcher()
        return cancelled

    def set_weight(self, campaign_id: str, weight: float) -> None:
        self.store.set_weight(campaign_id, check_weight(weight))

    def retry_failed(self, campaign_id: str, *, include_unknown: bool = False) -> int:
        """Requeue every ``failed`` message (and ``unknown`` if asked) with a fresh budget."""
        status = self.store.campaign_status(campaign_id)
        if status.state is CampaignState.CANCELLED:
            raise CampaignError(f"campaign {campaign_id!r} is cancelled")
        states = {MessageState.FAILED} | ({MessageState.UNKNOWN} if include_unknown else set())
        unique = {r.message_id: r for r in self.store.not_sent(campaign_id)}  # SSCAN repeats
        rows = [r for r in unique.values() if r.state in states and r.row and r.row[1]]
        if not rows:
            return 0
        size = self.producer.settings.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            batch = [BatchItem(int(r.row[0]), r.row[1], r.row[2] or {}) for r in chunk]
            self.producer.requeue(campaign_id, batch)
        return len(rows)

    def failures(self, campaign_id: str) -> Iterator[MessageRecord]:
        self.store.campaign_status(campaign_id)
        return self.store.not_sent(campaign_id)
