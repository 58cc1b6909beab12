"""What the fleet is sending and when each campaign will be done: the operator's view.

Each running campaign gets ``weight / sum of weights`` of its sender profile's effective
rate (the dispatcher and the limiter enforce that split), so its ETA is its open messages
over its share. Paused campaigns, and scheduled ones still waiting for their ``send_at``,
get no share; a campaign alone gets the whole rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.states import CampaignState
from ses_tasks.store.tracking import CampaignStatus, StatusStore

__all__ = ["ScheduledCampaign", "fleet_schedule", "format_eta"]

#: States that hold a share of the rate.
SENDING = frozenset({CampaignState.ENQUEUEING, CampaignState.RUNNING})


@dataclass(frozen=True, slots=True)
class ScheduledCampaign:
    status: CampaignStatus
    weight: float
    #: Share of the fleet's rate (0 while paused).
    share: float
    rate_per_s: float
    #: Seconds until every message is final at the current share; None if not sending.
    eta_s: float | None
    #: Batches stored, not yet handed to the broker.
    stored_batches: int
    in_flight_batches: int

    def to_dict(self) -> dict[str, Any]:
        s = self.status
        return {
            "id": s.id,
            "state": s.state.value,
            "profile": s.meta.get("profile", ""),
            "weight": self.weight,
            "share": round(self.share, 4),
            "rate_per_s": round(self.rate_per_s, 2),
            "sent": s.counts.get("sent", 0),
            "total": s.total,
            "open": s.open,
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "eta_at": None if self.eta_s is None else round(time.time() + self.eta_s, 1),
            "stored_batches": self.stored_batches,
            "in_flight_batches": self.in_flight_batches,
            "send_at": s.send_at,
            "scheduled": s.scheduled,
        }


def weight_of(status: CampaignStatus) -> float:
    try:
        return float(status.meta.get("weight", 1.0))
    except ValueError:
        return 1.0


def fleet_schedule(store: StatusStore, rates: dict[str, float]) -> list[ScheduledCampaign]:
    """Every campaign with work left, with its share of its profile's rate and its ETA.

    ``rates``: each profile's effective rate ('' is the unnamed one).
    """
    statuses = []
    for cid in store.active_campaign_ids():
        if cid == TRANSACTIONAL:
            continue
        try:
            status = store.campaign_status(cid)
        except Exception:  # retired or expired meanwhile
            continue
        if status.open or not status.enqueued_all:
            statuses.append(status)
    weights: dict[str, float] = {}
    for s in statuses:
        if s.state in SENDING and not s.scheduled:
            profile = s.meta.get("profile", "")
            weights[profile] = weights.get(profile, 0.0) + weight_of(s)
    out = []
    for s in statuses:
        weight, profile = weight_of(s), s.meta.get("profile", "")
        total_weight = weights.get(profile, 0.0)
        sending = s.state in SENDING and not s.scheduled
        share = weight / total_weight if sending and total_weight else 0.0
        rate = rates.get(profile, 0.0) * share
        eta = s.open / rate if rate > 0 else None
        in_flight = store.in_flight(s.id)
        out.append(
            ScheduledCampaign(s, weight, share, rate, eta, store.backlog_size(s.id), in_flight)
        )
    return out


def format_eta(eta_s: float | None) -> str:
    if eta_s is None:
        return "-"
    if eta_s < 90:
        return f"{eta_s:.0f} s"
    if eta_s < 5400:
        return f"{eta_s / 60:.0f} min"
    return f"{eta_s / 3600:.1f} h"
