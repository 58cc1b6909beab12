"""Every Redis key name, in one place.

Keys of one campaign share the ``{campaign id}`` hash tag, so a campaign's scripts touch a
single Redis Cluster slot. Message ids embed their campaign id (``<campaign>.<seq>``), which
makes any status read one key lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CAMPAIGN_ID_RE", "TRANSACTIONAL", "Keys", "campaign_of"]

#: Campaign ids are safe in keys, file names and URLs.
CAMPAIGN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The standing campaign that single transactional messages belong to.
TRANSACTIONAL = "transactional"


def campaign_of(message_id: str) -> str:
    campaign, sep, _ = message_id.rpartition(".")
    if not sep or not CAMPAIGN_ID_RE.match(campaign):
        raise ValueError(f"{message_id!r} is not a ses-tasks message id")
    return campaign


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "sestasks"

    def campaign(self, campaign_id: str) -> str:
        return f"{self.prefix}:c:{{{campaign_id}}}"

    def template(self, campaign_id: str) -> str:
        return f"{self.prefix}:c:{{{campaign_id}}}:template"

    def not_sent(self, campaign_id: str) -> str:
        return f"{self.prefix}:c:{{{campaign_id}}}:not-sent"

    def parked(self, campaign_id: str) -> str:
        return f"{self.prefix}:c:{{{campaign_id}}}:parked"

    def batches(self, campaign_id: str) -> str:
        """The batch ledger: batch id -> payload of every batch not yet settled."""
        return f"{self.prefix}:c:{{{campaign_id}}}:batches"

    def due(self, campaign_id: str) -> str:
        """Ledger entry -> when the sweeper republishes it unless a worker settles it first."""
        return f"{self.prefix}:c:{{{campaign_id}}}:due"

    def backlog(self, campaign_id: str) -> str:
        """Stored batches not yet handed to the broker (batch id -> first seq)."""
        return f"{self.prefix}:c:{{{campaign_id}}}:backlog"

    def dispatched(self, campaign_id: str) -> str:
        """Batches handed to the broker and not yet settled: the campaign's used credits."""
        return f"{self.prefix}:c:{{{campaign_id}}}:dispatched"

    def timeline(self, campaign_id: str, hour: int) -> str:
        """One hour of the campaign's sent/failed buckets (``hour``: Unix seconds // 3600)."""
        return f"{self.prefix}:c:{{{campaign_id}}}:tl:{hour}"

    def message_prefix(self, campaign_id: str) -> str:
        return f"{self.prefix}:m:{{{campaign_id}}}:"

    def message(self, message_id: str) -> str:
        return self.message_prefix(campaign_of(message_id)) + message_id

    def ses_id_prefix(self) -> str:
        """``<prefix><SES message id>`` holds our message id: feedback correlates by it."""
        return f"{self.prefix}:ses-id:"

    def ses_id(self, ses_message_id: str) -> str:
        return self.ses_id_prefix() + ses_message_id

    def campaigns_index(self) -> str:
        return f"{self.prefix}:campaigns"

    def active(self) -> str:
        """Campaigns that may have ledger entries: the sweeper's work list."""
        return f"{self.prefix}:active"

    def sweeper_lock(self) -> str:
        """Held by the one worker process that sweeps for the whole fleet."""
        return f"{self.prefix}:sweeper"

    def dispatcher_lock(self) -> str:
        """Held by the one worker process that dispatches for the whole fleet."""
        return f"{self.prefix}:dispatcher"

    def dispatch_kick(self) -> str:
        """A list the dispatcher blocks on: a push wakes it (a batch settled, one stored)."""
        return f"{self.prefix}:dispatch-kick"

    def scheduled(self) -> str:
        """Work waiting for its time (score: due, ms): single messages sent with ``send_at``
        (member: the message id) and scheduled campaigns' starts (``start:<campaign id>``).

        An index for the scheduler's wake-ups, not the truth: a single message's ledger
        entry is due at its ``send_at`` too, so the sweeper publishes it if the index
        entry was never written; a campaign's ``send_at`` is its record's field.
        """
        return f"{self.prefix}:scheduled"

    def scheduler_lock(self) -> str:
        """Held by the one worker process that publishes scheduled work for the fleet."""
        return f"{self.prefix}:scheduler"

    def schedule_kick(self) -> str:
        """A list the scheduler blocks on: a push wakes it (something was scheduled)."""
        return f"{self.prefix}:schedule-kick"

    def workers(self) -> str:
        """Live worker processes (``token|batches at once`` -> heartbeat deadline, ms)."""
        return f"{self.prefix}:workers"

    def workers_seen(self) -> str:
        """Worker processes by their last heartbeat (token -> Unix ms), kept past a silent
        one's death so people see it stale (worker/heartbeat.py)."""
        return f"{self.prefix}:workers-seen"

    def worker_info(self, token: str) -> str:
        """One worker process's self-description (JSON, ``heartbeat.describe``)."""
        return f"{self.prefix}:worker-info:{token}"

    def consumers(self, queue: str) -> str:
        """Worker processes consuming ``queue`` (token -> heartbeat deadline, ms)."""
        return f"{self.prefix}:consumers:{queue}"

    def suppression(self) -> str:
        return f"{self.prefix}:suppressed"

    # Delivery feedback (ses_tasks.feedback) -------------------------------------------------

    def feedback_seen(self, sns_message_id: str) -> str:
        """An SNS MessageId already handled: replays and SNS retries are ignored."""
        return f"{self.prefix}:fb:seen:{sns_message_id}"

    def feedback_uncorrelated(self) -> str:
        """Count of SES notifications whose message id we never recorded."""
        return f"{self.prefix}:fb:uncorrelated"

    def transient_bounces(self, email: str) -> str:
        """Sorted set of one address's transient bounces (member: SES id, score: time)."""
        return f"{self.prefix}:fb:transient:{email}"

    # Dashboard (ses_tasks.dashboard) ---------------------------------------------------------

    def dashboard_revoked(self, sid: str) -> str:
        """A dashboard session id logged out before its cookie expires (TTL: its remaining
        lifetime): a copied cookie must not outlive the logout."""
        return f"{self.prefix}:dashboard:revoked:{sid}"
