"""Delivery feedback: SES notifications through SNS, verified, parsed and applied.

``sns`` verifies envelopes, ``events`` parses both notification shapes, ``apply`` records
feedback and suppresses addresses, ``handler`` ties them together for ``asgi`` (standalone
``ses-tasks feedback serve``), the Django/Flask views and batch ingest.
"""

from __future__ import annotations

from ses_tasks.feedback.apply import (
    FEEDBACK_COUNTERS,
    ApplyResult,
    FeedbackApplier,
    FeedbackStatus,
    MessageFeedback,
)
from ses_tasks.feedback.asgi import FeedbackApp, create_app
from ses_tasks.feedback.events import (
    Bounce,
    BouncedRecipient,
    Complaint,
    Delivery,
    DeliveryDelay,
    EventKind,
    Mail,
    ParseError,
    Reject,
    SesEvent,
    parse_event,
)
from ses_tasks.feedback.handler import FeedbackHandler, HttpResponse, IngestReport
from ses_tasks.feedback.settings import FeedbackSettings, load_feedback_settings
from ses_tasks.feedback.sns import SnsMessage, SnsVerificationError, SnsVerifier, canonical_string

__all__ = [
    "FEEDBACK_COUNTERS",
    "ApplyResult",
    "Bounce",
    "BouncedRecipient",
    "Complaint",
    "Delivery",
    "DeliveryDelay",
    "EventKind",
    "FeedbackApp",
    "FeedbackApplier",
    "FeedbackHandler",
    "FeedbackSettings",
    "FeedbackStatus",
    "HttpResponse",
    "IngestReport",
    "Mail",
    "MessageFeedback",
    "ParseError",
    "Reject",
    "SesEvent",
    "SnsMessage",
    "SnsVerificationError",
    "SnsVerifier",
    "canonical_string",
    "create_app",
    "feedback_status",
    "load_feedback_settings",
    "parse_event",
]


def feedback_status(campaign_id: str, *, handler: FeedbackHandler | None = None) -> FeedbackStatus:
    """Feedback counts and rates of a campaign (settings from the environment by default)."""
    return (handler or FeedbackHandler.from_settings()).applier.feedback_status(campaign_id)
