"""The public Python API: one object holding settings, the store and the Celery app.

from ses_tasks import SesTasks
ses = SesTasks()                      # settings from SES_TASKS_* environment
result = ses.send_email(from_="a@example.com", to=["b@example.com"], subject="Hi",
                        text="Hello")
result.message_id, result.get(timeout=30)   # -> {"state": "sent", "ses_message_id": ...}
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult

from ses_tasks.config import Settings, load_settings
from ses_tasks.errors import ConfigurationError, ValidationError
from ses_tasks.events import check_metadata, encode_metadata
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.ratelimit import Priority
from ses_tasks.message.spec import CampaignTemplate, MessageSpec, render_message
from ses_tasks.produce.campaigns import CampaignControl, CampaignProducer, ProgressCallback
from ses_tasks.produce.consumers import ConsumerWatch
from ses_tasks.queue.app import bulk_queue, create_app, transactional_queue
from ses_tasks.queue.publish import publish_job
from ses_tasks.smtp.endpoint import PortMode
from ses_tasks.states import MessageState
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
        self, *, profile: str = "", metadata: dict[str, Any] | None = None, **fields: Any
    ) -> MessageResult:
        """Validate and enqueue one message on the transactional queue.

        ``profile`` names the sender profile (SES account, region) that sends it.
        ``metadata``: a small JSON object (at most 2 KiB) kept in the message's record and
        given back in its delivery events (``ses_tasks.events``), never put in the email.

        The message and its ledger entry are recorded first, then published. With the same
        ``idempotency_key`` a message still waiting is published again (a copy is harmless:
        claims are idempotent) and one already handled is not. Once this returns, a failed
        publish is no loss: the fleet's sweeper publishes the entry.
        """
        metadata = check_metadata(metadata)  # kept in the record, never in the email
        spec = self.build_message(profile=profile, **fields)
        message_id = transactional_message_id(spec.idempotency_key)
        first = (spec.to or spec.cc or spec.bcc)[0]
        item = BatchItem(
            message_id.split(".", 1)[1], first, {}, 0, spec.model_dump(mode="json", by_alias=True)
        )
        job = BatchJob(TRANSACTIONAL, (item,), message_id, Priority.TRANSACTIONAL, profile)
        new, state, in_ledger = self.store.enqueue_one(message_id, first, job.payload())
        if metadata and new:  # before the publish: the worker's events read it
            key = self.store.keys.message(message_id)
            self.redis.hset(key, "metadata", encode_metadata(metadata))
        if new or (state is MessageState.QUEUED and in_ledger):
            try:
                publish_job(self.app, self.settings.endpoint.mode, job)
            except Exception as exc:
                log.warning(
                    "message %s recorded but not published (%s): swept later", message_id, exc
                )
                with contextlib.suppress(Exception):
                    self.store.mark_due_now(TRANSACTIONAL, [message_id])
            mode = self.settings.endpoint.mode
            self._consumers.check(
                transactional_queue(mode),
                hint=f"this process sends in {mode.value} mode; start `ses-tasks worker "
                f"--mode {mode.value}` or align SES_TASKS_MODE/SES_TASKS_PORT",
            )
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
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> CampaignStatus:
        """Validate the template, then store ``recipients`` in batches for the dispatcher.

        ``resume=True`` continues an interrupted enqueue of ``campaign_id`` (same template
        and recipients), without sending anything twice. ``weight`` sets the campaign's
        share of the rate against other running campaigns of its profile (default 1: equal
        shares); ``profile`` names the sender profile (default: the unnamed one).
        ``metadata`` (as for ``send_email``) belongs to every message of the campaign.
        """
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
