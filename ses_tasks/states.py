"""The vocabulary shared by every stage: message states and send outcomes."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "FINAL_STATES",
    "OPEN_STATES",
    "CampaignState",
    "ClaimDecision",
    "MessageState",
    "Outcome",
]


class MessageState(StrEnum):
    #: Recorded and waiting in the broker.
    QUEUED = "queued"
    #: Claimed by a worker; the SMTP transaction may be under way.
    SENDING = "sending"
    #: SES answered ``250 Ok <id>``; ``ses_message_id`` holds the id.
    SENT = "sent"
    #: A transient failure; another attempt is scheduled.
    RETRYING = "retrying"
    #: Held back without using an attempt: quota used up, campaign paused, endpoint down.
    DEFERRED = "deferred"
    #: Refused for good, with ``code`` and ``reason``.
    FAILED = "failed"
    #: The recipient is on the suppression list; nothing was sent.
    SUPPRESSED = "suppressed"
    #: The connection was lost after the data went out: SES may or may not have it.
    UNKNOWN = "unknown"
    #: The campaign was cancelled before this message was sent.
    CANCELLED = "cancelled"


#: States a message never leaves on its own (retry-failed may requeue failed/unknown).
FINAL_STATES = frozenset(
    {
        MessageState.SENT,
        MessageState.FAILED,
        MessageState.SUPPRESSED,
        MessageState.UNKNOWN,
        MessageState.CANCELLED,
    }
)


#: States that still need work: the campaign is not done while one of its messages is here.
OPEN_STATES = frozenset(MessageState) - FINAL_STATES


class CampaignState(StrEnum):
    #: Records are being written and batches enqueued.
    ENQUEUEING = "enqueueing"
    #: Batches are being sent.
    RUNNING = "running"
    #: Held by a user or by the system (quota, endpoint failure); ``reason`` says which.
    PAUSED = "paused"
    #: Stopped for good; unsent messages end ``cancelled``.
    CANCELLED = "cancelled"
    #: Every message is in a final state.
    COMPLETED = "completed"


class Outcome(StrEnum):
    """What one SMTP transaction (or its failure) means for the message."""

    SENT = "sent"
    THROTTLED = "throttled"
    QUOTA_EXHAUSTED = "quota_exhausted"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    FATAL = "fatal"
    UNKNOWN = "unknown"


class ClaimDecision(StrEnum):
    """What the claim script decided for one message (parsed once, in ``tracking``)."""

    #: Ours now: send it.
    GO = "go"
    #: Ours now, but a worker that died held it: it may already have been sent.
    RECOVERED = "go:recovered"
    #: Another live worker holds it; try again after its lease.
    BUSY = "busy"
    #: Final already (``skipped_state`` says which): nothing to do.
    SKIP = "skip"
    #: The campaign record is gone (Redis lost it, or it expired): send nothing blind.
    MISSING = "skip:missing"
    #: A copy of a batch that was already settled: every message is final or elsewhere.
    STALE = "skip:stale"
    #: The campaign is cancelled: recorded ``cancelled``.
    CANCELLED = "cancelled"
    #: On the suppression list: recorded ``suppressed``.
    SUPPRESSED = "suppressed"
    #: The campaign is paused: park it (or, for transactional mail, retry later).
    PAUSED = "paused"
