"""Apply parsed SES feedback: correlate, record, suppress, and pause campaigns at risk.

Correlation goes SES message id -> our message id (the index ``tracking`` writes when a
message is sent) -> the message record. Feedback lives in its own fields of the message
record (``feedback``, ``bounce_type``, ...) and its own campaign counters (``delivered``,
``bounced``, ``hard_bounced``, ``complained``, ``delayed``, ``rejected``); the per-state
counters stay untouched and keep adding up to ``total``. One Lua script per event makes the
update atomic and idempotent per (message, counter), so duplicates never double count.

An event whose SES message id we never stored is counted as uncorrelated and does not touch
the suppression list unless ``suppress_uncorrelated`` says so: it may be another sender's
mail on the account, or not mail of this account at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis

from ses_tasks import events as delivery_events
from ses_tasks.errors import CampaignError, ValidationError
from ses_tasks.feedback.events import Bounce, Complaint, DeliveryDelay, EventKind, Reject, SesEvent
from ses_tasks.feedback.settings import FeedbackSettings
from ses_tasks.keys import TRANSACTIONAL, Keys, campaign_of
from ses_tasks.message.address import canonical_address
from ses_tasks.ops import metrics
from ses_tasks.states import CampaignState
from ses_tasks.store.suppression import SuppressionList
from ses_tasks.store.tracking import StatusStore

__all__ = [
    "FEEDBACK_COUNTERS",
    "ApplyResult",
    "FeedbackApplier",
    "FeedbackStatus",
    "MessageFeedback",
]

log = logging.getLogger("ses_tasks.feedback")

#: Feedback counters kept in the campaign hash, apart from the per-state counters.
#: ``hard_bounced`` counts permanent bounces only: the rate SES judges accounts by.
FEEDBACK_COUNTERS = ("delivered", "bounced", "hard_bounced", "complained", "delayed", "rejected")

_NAMES = {
    EventKind.DELIVERY: ("delivered", 2),
    EventKind.BOUNCE: ("bounced", 3),
    EventKind.COMPLAINT: ("complained", 4),
    EventKind.DELIVERY_DELAY: ("delayed", 1),
    EventKind.REJECT: ("rejected", 3),
}

RECORD_LUA = (
    resources.files("ses_tasks.store").joinpath("lua", "feedback_record.lua").read_text("utf-8")
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: ``type`` label of ``ses_tasks_feedback_events_total`` per SES event kind.
_EVENT_TYPES = {
    EventKind.DELIVERY: "delivery",
    EventKind.BOUNCE: "bounce",
    EventKind.COMPLAINT: "complaint",
    EventKind.DELIVERY_DELAY: "delivery_delay",
    EventKind.REJECT: "reject",
}


@dataclass(frozen=True, slots=True)
class ApplyResult:
    #: ``applied``, ``duplicate``, ``uncorrelated`` or ``ignored``.
    status: str
    ses_message_id: str = ""
    message_id: str | None = None
    campaign_id: str | None = None
    suppressed: tuple[str, ...] = ()
    #: The pause reason, when this event paused the campaign.
    paused: str | None = None


@dataclass(frozen=True, slots=True)
class FeedbackStatus:
    campaign_id: str
    sent: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def bounce_rate(self) -> float:
        """Permanent bounces per sent message (SES reviews accounts at about 5%)."""
        return self.counts.get("hard_bounced", 0) / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        """Complaints per sent message (SES reviews accounts at about 0.1%)."""
        return self.counts.get("complained", 0) / self.sent if self.sent else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.campaign_id,
            "sent": self.sent,
            **{name: self.counts.get(name, 0) for name in FEEDBACK_COUNTERS},
            "bounce_rate": self.bounce_rate,
            "complaint_rate": self.complaint_rate,
        }


@dataclass(frozen=True, slots=True)
class MessageFeedback:
    """The feedback fields of one message record."""

    message_id: str
    feedback: str | None
    feedback_at: float | None = None
    bounce_type: str = ""
    bounce_subtype: str = ""
    diagnostic: str = ""
    complaint_type: str = ""
    delay_type: str = ""
    reject_reason: str = ""
    #: Every feedback counter recorded for this message (``bounced``, ``delivered`` ...).
    seen: frozenset[str] = frozenset()


def _suppression_reason(bounce: Bounce, diagnostic: str) -> str:
    head = f"bounce: {bounce.bounce_type}/{bounce.bounce_subtype}"
    return f"{head}: {diagnostic}" if diagnostic else head


class FeedbackApplier:
    """Applies ``SesEvent``s to the status store, the suppression list and campaign state."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "sestasks",
        settings: FeedbackSettings | None = None,
        store: StatusStore | None = None,
        suppression: SuppressionList | None = None,
        events: delivery_events.EventDispatcher | None = None,
    ) -> None:
        """``events``: where the delivery events of applied feedback go (``bounced`` ...);
        default: this process's dispatcher (``SES_TASKS_EVENT_HOOKS``, ``ses_tasks.events``)."""
        self.redis = client
        self.keys = Keys(key_prefix)
        self.settings = settings or FeedbackSettings()
        self.store = store or StatusStore(client, key_prefix=key_prefix)
        self.suppression = suppression or SuppressionList(client, key_prefix=key_prefix)
        self._record = client.register_script(RECORD_LUA)
        self._events = events
        self._metadata = delivery_events.MetadataLookup(client, self.keys)

    def apply(self, event: SesEvent) -> ApplyResult:
        result = self._apply(event)
        if event.kind is not EventKind.OTHER:
            metrics.feedback_event(_EVENT_TYPES[event.kind], result.status)
        return result

    def _apply(self, event: SesEvent) -> ApplyResult:
        if event.kind is EventKind.OTHER:
            return ApplyResult("ignored", event.ses_message_id)
        ses_id = event.ses_message_id
        message_id = self.store.message_id_for_ses_id(ses_id)
        if message_id is None:
            self.redis.incr(self.keys.feedback_uncorrelated())
            if self.settings.suppress_uncorrelated:
                suppressed = self._suppress(event)
                what = "suppressing as SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED says"
            else:
                suppressed = ()
                what = "not suppressing (SES_TASKS_FEEDBACK_SUPPRESS_UNCORRELATED is off)"
            log.info(
                "%s for unknown SES message id %.100s: not ours or expired; %s",
                event.kind,
                ses_id,
                what,
            )
            return ApplyResult("uncorrelated", ses_id, suppressed=suppressed)
        campaign_id = campaign_of(message_id)
        raw = self._record(
            keys=[self.keys.campaign(campaign_id), self.keys.message(message_id)],
            args=self._record_args(event),
        )
        outcome = _text(raw[0])
        if outcome == "missing":
            # The SES id index proves we sent it; only the record expired: still suppress.
            self.redis.incr(self.keys.feedback_uncorrelated())
            log.info("%s for %s: message record %s expired", event.kind, ses_id, message_id)
            return ApplyResult(
                "uncorrelated", ses_id, message_id, campaign_id, suppressed=self._suppress(event)
            )
        if outcome == "duplicate":
            return ApplyResult("duplicate", ses_id, message_id, campaign_id)
        suppressed = self._suppress(event)
        paused = None
        if event.kind in (EventKind.BOUNCE, EventKind.COMPLAINT):
            sent, hard, complained = (int(_text(v)) for v in raw[1:4])
            paused = self._maybe_pause(campaign_id, sent, hard, complained, state=_text(raw[4]))
        self._emit(event, message_id, suppressed)
        return ApplyResult("applied", ses_id, message_id, campaign_id, suppressed, paused)

    def _emit(self, event: SesEvent, message_id: str, suppressed: tuple[str, ...]) -> None:
        """The delivery event of newly applied feedback (never of a duplicate): queued for
        the hooks, so an application learns of the bounce once however often SNS sends it."""
        try:
            events = self._events or delivery_events.dispatcher()
            delivery_events.feedback_event(
                events, event, message_id=message_id, suppressed=suppressed, lookup=self._metadata
            )
        except Exception:  # the feedback is recorded; an event must not undo that
            log.exception("delivery event of %s for %s not queued", event.kind, message_id)

    @staticmethod
    def _record_args(event: SesEvent) -> list[str]:
        name, rank = _NAMES[event.kind]
        detail = event.detail
        bounce_type = subtype = diagnostic = extra = ""
        counters = [name]
        if isinstance(detail, Bounce):
            bounce_type, subtype = detail.bounce_type, detail.bounce_subtype
            diagnostic = next(
                (r.diagnostic_code for r in detail.recipients if r.diagnostic_code), ""
            )
            if detail.permanent:
                counters.append("hard_bounced")
        elif isinstance(detail, Complaint):
            extra = detail.feedback_type
        elif isinstance(detail, DeliveryDelay):
            extra = detail.delay_type
            diagnostic = next(
                (r.diagnostic_code for r in detail.recipients if r.diagnostic_code), ""
            )
        elif isinstance(detail, Reject):
            extra = detail.reason
        return [name, str(rank), bounce_type, subtype, diagnostic[:1000], extra[:200], *counters]

    def _suppress(self, event: SesEvent) -> tuple[str, ...]:
        """Suppress what the event calls for; returns the addresses newly suppressed.

        An address SES reports that we cannot parse is logged and skipped: refusing the
        whole notification would only make SNS redeliver it for ever.
        """
        detail = event.detail
        added: list[str] = []

        def suppress(email: str, reason: str) -> None:
            try:
                if self.suppression.add([email], reason=reason, source="feedback", overwrite=False):
                    added.append(canonical_address(email))
            except ValidationError as exc:
                log.warning("not suppressing an address from %s: %s", event.kind, exc)

        if isinstance(detail, Bounce) and detail.permanent:
            for r in detail.recipients:
                suppress(r.email, _suppression_reason(detail, r.diagnostic_code))
        elif isinstance(detail, Bounce) and detail.transient:
            limit = self.settings.transient_suppress_after
            for r in detail.recipients:
                event_id = f"{event.ses_message_id}:{detail.feedback_id}"
                try:
                    count = self.suppression.record_transient(
                        r.email, event_id, window_s=self.settings.transient_window_s
                    )
                except ValidationError as exc:
                    log.warning("not counting a transient bounce: %s", exc)
                    continue
                if limit and count >= limit:
                    reason = (
                        f"{_suppression_reason(detail, r.diagnostic_code)}"
                        f" ({count} transient bounces in {self.settings.transient_window_s:.0f} s)"
                    )
                    suppress(r.email, reason)
        elif isinstance(detail, Complaint):
            reason = f"complaint: {detail.feedback_type or 'unspecified'}"
            for email in detail.recipients:
                suppress(email, reason)
        for email in added:
            log.info("suppressed %s after %s", email, event.kind)
        return tuple(added)

    def _maybe_pause(
        self, campaign_id: str, sent: int, hard: int, complained: int, *, state: str
    ) -> str | None:
        s = self.settings
        if campaign_id == TRANSACTIONAL or sent < s.min_sample:
            return None
        if state not in (CampaignState.RUNNING.value, CampaignState.ENQUEUEING.value):
            return None
        reason = None
        if hard / sent >= s.bounce_pause_rate:
            reason = (
                f"feedback: bounce rate {hard / sent:.2%} ({hard}/{sent} sent)"
                f" reached the {s.bounce_pause_rate:.2%} limit"
            )
        elif complained / sent >= s.complaint_pause_rate:
            reason = (
                f"feedback: complaint rate {complained / sent:.2%} ({complained}/{sent} sent)"
                f" reached the {s.complaint_pause_rate:.2%} limit"
            )
        if reason is None:
            return None
        try:
            paused = self.store.pause(campaign_id, reason, kind="feedback")
        except CampaignError:
            return None
        if paused:
            log.warning("campaign %s paused: %s", campaign_id, reason)
            return reason
        return None

    # Reads -------------------------------------------------------------------------------

    def feedback_status(self, campaign_id: str) -> FeedbackStatus:
        raw = self.redis.hmget(self.keys.campaign(campaign_id), ["id", "sent", *FEEDBACK_COUNTERS])
        if raw[0] is None:
            raise CampaignError(f"no campaign {campaign_id!r}")
        counts = {
            name: int(_text(v)) if v is not None else 0
            for name, v in zip(FEEDBACK_COUNTERS, raw[2:], strict=True)
        }
        return FeedbackStatus(campaign_id, int(_text(raw[1] or 0)), counts)

    def message_feedback(self, message_id: str) -> MessageFeedback | None:
        try:
            key = self.keys.message(message_id)
        except ValueError:
            return None
        raw = self.redis.hgetall(key)
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        at = data.get("feedback_at")
        return MessageFeedback(
            message_id=message_id,
            feedback=data.get("feedback"),
            feedback_at=int(at) / 1000.0 if at else None,
            bounce_type=data.get("bounce_type", ""),
            bounce_subtype=data.get("bounce_subtype", ""),
            diagnostic=data.get("diagnostic", ""),
            complaint_type=data.get("complaint_type", ""),
            delay_type=data.get("delay_type", ""),
            reject_reason=data.get("reject_reason", ""),
            seen=frozenset(k[3:] for k in data if k.startswith("fb:")),
        )

    def uncorrelated(self) -> int:
        return int(_text(self.redis.get(self.keys.feedback_uncorrelated()) or 0))
