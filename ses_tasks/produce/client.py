"""The public Python API: one object holding settings, the store and the Celery app.

from ses_tasks import SesTasks
ses = SesTasks()                      # settings from SES_TASKS_* environment
result = ses.send_email(from_="a@example.com", to=["b@example.com"], subject="Hi",
                        text="Hello")
result.message_id, result.get(timeout=30)   # -> {"state": "sent", "ses_message_id": ...}
ses.send_email(..., send_at="2025-06-01T09:00:00+02:00", priority="bulk", profile="eu")
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ConfigurationError, ValidationError
from ses_tasks.events import check_metadata, encode_metadata
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.message.spec import CampaignTemplate, MessageSpec, render_message
from ses_tasks.produce.campaigns import CampaignControl, CampaignProducer, ProgressCallback
from ses_tasks.produce.consumers import ConsumerWatch
from ses_tasks.produce.options import check_priority, check_profile_name, parse_send_at
from ses_tasks.queue.app import bulk_queue, create_app, transactional_queue
from ses_tasks.queue.publish import publish_job
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.states import FINAL_STATES, MessageState
from ses_tasks.store.connections import sync_redis
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import CampaignStatus, MessageRecord, StatusStore
from ses_tasks.worker.delivery import BatchItem, BatchJob

__all__ = ["MessageResult", "SesTasks"]

log = logging.getLogger(__name__)


class MessageResult(AsyncResult):  # type: ignore[misc]
    """A Celery ``AsyncResult`` whose id is the message id; ``get()`` is the delivery record."""

    @property
    def message_id(self) -> str:
        return str(self.id)

    def __str__(self) -> str:
        return self.message_id


class StoredMessageResult(MessageResult):
    """A message sent at bulk priority: it travels as a batch of the bulk queue, whose
    task result is the batch's, so ``get()`` reads the message's record in the status store
    until it is final (same keys as a transactional message's result)."""

    def __init__(self, message_id: str, *, app: Celery, store: StatusStore) -> None:
        super().__init__(message_id, app=app)
        self._store = store

    def record(self) -> MessageRecord | None:
        return self._store.message_status(self.message_id)

    def ready(self) -> bool:
        record = self.record()
        return record is not None and record.state in FINAL_STATES

    def get(  # type: ignore[override]
        self, timeout: float | None = None, interval: float = 0.2, **_: Any
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.record()
            if record is not None and record.state in FINAL_STATES:
                return {
                    "message_id": self.message_id,
                    "state": record.state.value,
                    "ses_message_id": record.ses_message_id,
                    "code": record.code,
                    "reason": record.reason,
                }
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"message {self.message_id} is not final yet")
            time.sleep(interval)


def transactional_message_id(idempotency_key: str | None) -> str:
    """Stable for a given key, so enqueueing the same message twice sends it once."""
    if idempotency_key:
        digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
        return f"{TRANSACTIONAL}.{digest}"
    return f"{TRANSACTIONAL}.{uuid.uuid4().hex}"


class SesTasks:
    def __init__(self, settings: Settings | None = None, *, celery_app: Celery | None = None):
        self.settings = settings or load_settings()
        self._app = celery_app

    def __repr__(self) -> str:
        return f"<SesTasks endpoint={self.settings.endpoint.key}>"

    @cached_property
    def app(self) -> Celery:
        return self._app or create_app(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        return sync_redis(self.settings.redis_url, settings=self.settings)

    @cached_property
    def store(self) -> StatusStore:
        return StatusStore(
            self.redis,
            key_prefix=self.settings.key_prefix,
            retention_s=self.settings.retention_s,
            redeliver_after_s=self.settings.redeliver_after,
        )

    @cached_property
    def suppression(self) -> SuppressionList:
        return SuppressionList(self.redis, key_prefix=self.settings.key_prefix)

    @cached_property
    def _consumers(self) -> ConsumerWatch:
        return ConsumerWatch(self.redis, self.store.keys)

    @cached_property
    def _producer(self) -> CampaignProducer:
        return CampaignProducer(self.settings, self.store, self.app)

    @cached_property
    def _control(self) -> CampaignControl:
        return CampaignControl(self._producer)

    # Transactional -----------------------------------------------------------------------

    def sender(self, profile: str = "") -> Settings:
        """The settings ``profile`` sends with; ValidationError naming it if unknown."""
        try:
            return self.settings.for_profile(profile)
        except ConfigurationError as exc:
            raise ValidationError("profile", exc.problem) from None

    def build_message(self, *, profile: str = "", **fields: Any) -> MessageSpec:
        """Validate a message now (raises ``ValidationError``), before anything is enqueued."""
        if "from_" in fields:
            fields["from"] = fields.pop("from_")
        fields.setdefault("configuration_set", self.sender(profile).configuration_set)
        spec = MessageSpec.model_validate(fields)
        render_message(spec, max_bytes=self.settings.max_message_bytes)
        return spec

    def send_email(
        self,
        *,
        profile: str = "",
        priority: Priority | str = Priority.TRANSACTIONAL,
        send_at: datetime | str | None = None,
        metadata: dict[str, Any] | None = None,
        **fields: Any,
    ) -> MessageResult:
        """Validate and enqueue one message.

        ``profile`` names the sender profile (SES account, region) that sends it.
        ``priority``: ``"transactional"`` (default: the transactional queue, ahead of all
        bulk in the rate limiter) or ``"bulk"`` (the bulk queue, under the bulk share of
        the rate, like campaign mail). ``send_at``: a time zone-aware datetime or an
        ISO-8601 string with an offset; the message is recorded now (``queued``, its record
        says ``send_at``) and published by the fleet's scheduler at that time, so it
        survives worker restarts. A time already past means now; at most
        ``SES_TASKS_RETENTION_S`` ahead. Each is checked before anything is stored
        (``ValidationError`` naming it). ``metadata``: a small JSON object (at most 2 KiB)
        kept in the message's record and given back in its delivery events
        (``ses_tasks.events``), never put in the email.

        The message and its ledger entry are recorded first, then published. With the same
        ``idempotency_key`` a message still waiting is published again (a copy is harmless:
        claims are idempotent) unless it waits for its ``send_at``, and one already
        handled is not; the first call's ``send_at``, priority and profile stand. Once this
        returns, a failed publish is no loss: the fleet's sweeper publishes the entry.
        """
        lane = check_priority(priority)
        profile = check_profile_name(profile)
        send_at_ms = parse_send_at(send_at, retention_s=self.settings.retention_s)
        metadata = check_metadata(metadata)  # kept in the record, never in the email
        spec = self.build_message(profile=profile, **fields)
        message_id = transactional_message_id(spec.idempotency_key)
        first = (spec.to or spec.cc or spec.bcc)[0]
        item = BatchItem(
            message_id.split(".", 1)[1], first, {}, 0, spec.model_dump(mode="json", by_alias=True)
        )
        job = BatchJob(TRANSACTIONAL, (item,), message_id, lane, profile)
        done = self.store.enqueue_single(message_id, first, job.payload(), send_at_ms=send_at_ms)
        if metadata and done.new:  # before the publish: the worker's events read it
            key = self.store.keys.message(message_id)
            self.redis.hset(key, "metadata", encode_metadata(metadata))
        waiting = done.waiting_until_ms is not None
        if not waiting and (done.new or (done.state is MessageState.QUEUED and done.in_ledger)):
            try:
                publish_job(self.app, self.settings.endpoint.mode, job)
            except Exception as exc:
                log.warning(
                    "message %s recorded but not published (%s): swept later", message_id, exc
                )
                with contextlib.suppress(Exception):
                    self.store.mark_due_now(TRANSACTIONAL, [message_id])
        if done.new or waiting or done.state is MessageState.QUEUED:
            mode = self.settings.endpoint.mode
            queue = bulk_queue(mode) if lane is Priority.BULK else transactional_queue(mode)
            self._consumers.check(
                queue,
                hint=f"this process sends in {mode.value} mode; start `ses-tasks worker "
                f"--mode {mode.value}` or align SES_TASKS_MODE/SES_TASKS_PORT",
            )
        if lane is Priority.BULK:
            return StoredMessageResult(message_id, app=self.app, store=self.store)
        return MessageResult(message_id, app=self.app)

    # Campaigns ---------------------------------------------------------------------------

    def send_campaign(
        self,
        *,
        from_: str,
        subject: str,
        recipients: str | Path | Iterable[Any],
        text: str | None = None,
        html: str | None = None,
        campaign_id: str | None = None,
        progress: ProgressCallback | None = None,
        resume: bool = False,
        weight: float = 1.0,
        profile: str = "",
        send_at: datetime | str | None = None,
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> CampaignStatus:
        """Validate the template, then store ``recipients`` in batches for the dispatcher.

        ``resume=True`` continues an interrupted enqueue of ``campaign_id`` (same template
        and recipients), without sending anything twice. ``weight`` sets the campaign's
        share of the rate against other running campaigns of its profile (default 1: equal
        shares); ``profile`` names the sender profile (default: the unnamed one).
        ``send_at`` (as for ``send_email``) schedules the campaign: everything is stored
        now, and nothing is handed to the workers before then; ``pause``, ``resume`` and
        ``cancel`` work meanwhile, and ``campaign_status(id).send_at`` shows it. A resumed
        enqueue keeps the schedule the campaign was created with. ``metadata`` (as for
        ``send_email``) belongs to every message of the campaign.
        """
        profile = check_profile_name(profile)
        send_at_ms = parse_send_at(send_at, retention_s=self.settings.retention_s)
        metadata = check_metadata(metadata)  # every message's; never in the emails
        options.setdefault("configuration_set", self.sender(profile).configuration_set)
        template = CampaignTemplate(
            from_=from_,
            subject=subject,
            text=text,
            html=html,
            max_bytes=self.settings.max_message_bytes,
            **options,
        )
        status = self._producer.send(
            template,
            recipients,
            campaign_id=campaign_id,
            progress=progress,
            resume=resume,
            weight=weight,
            profile=profile,
            send_at_ms=send_at_ms,
            metadata=encode_metadata(metadata) if metadata else "",
        )
        # The fleet's dispatcher hands batches to a bulk queue of either port mode.
        self._consumers.check(*(bulk_queue(m) for m in PortMode), hint="campaign stored")
        return status

    def set_weight(self, campaign_id: str, weight: float) -> None:
        """Change a campaign's share of the rate while it runs."""
        self._control.set_weight(campaign_id, weight)

    def campaign_status(self, campaign_id: str) -> CampaignStatus:
        return self.store.campaign_status(campaign_id)

    def message_status(self, message_id: str) -> MessageRecord | None:
        return self.store.message_status(message_id)

    def pause(self, campaign_id: str) -> bool:
        return self._control.pause(campaign_id)

    def resume(self, campaign_id: str) -> int:
        return self._control.resume(campaign_id)

    def cancel(self, campaign_id: str) -> int:
        return self._control.cancel(campaign_id)

    def retry_failed(self, campaign_id: str, *, include_unknown: bool = False) -> int:
        return self._control.retry_failed(campaign_id, include_unknown=include_unknown)

    def failures(self, campaign_id: str) -> Iterator[MessageRecord]:
        return self._control.failures(campaign_id)

    def suppress(self, emails: Sequence[str], *, reason: str = "added by user") -> int:
        return self.suppression.add(emails, reason=reason)
