"""The status store: one record per message, counters per campaign, all in Redis.

Every state change is one Lua script that updates the message record and moves one unit
between the campaign's per-state counters, so the counters always add up to ``total``.
Message records are written lazily: a message of a campaign with no record yet is
``queued``. That keeps enqueueing a million recipients at one counter update per batch.

Producers and the CLI use the synchronous ``StatusStore``; workers, which run an event
loop, use ``AsyncStatusStore`` for the per-batch hot path (claim, finish, park).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import redis.asyncio as aioredis

from ses_tasks.errors import CampaignError
from ses_tasks.keys import CAMPAIGN_ID_RE, TRANSACTIONAL, Keys, campaign_of
from ses_tasks.states import OPEN_STATES, CampaignState, ClaimDecision, MessageState
from ses_tasks.store.scripts import load_script, tracking_script
from ses_tasks.store.suppression import lookup_fields
from ses_tasks.store.timeline import KEEP_HOURS, bucket_start

__all__ = [
    "COUNTERS",
    "AsyncStatusStore",
    "CampaignStatus",
    "Claim",
    "ClaimReply",
    "DispatchReply",
    "Enqueued",
    "LedgerEntry",
    "MessageRecord",
    "RenewReply",
    "Settlement",
    "StatusStore",
    "Transition",
]

#: Per-state counters of a campaign, in the order status output shows them.
COUNTERS = tuple(state.value for state in MessageState)


CLAIM_LUA = tracking_script("tracking_claim.lua")
FINISH_LUA = tracking_script("tracking_finish.lua")
PARK_LUA = tracking_script("tracking_park.lua")
RESUME_LUA = tracking_script("tracking_resume.lua")
CONTROL_LUA = tracking_script("tracking_control.lua")
CANCEL_PARKED_LUA = tracking_script("tracking_cancel_parked.lua")
RENEW_LUA = tracking_script("tracking_renew.lua")
TAKE_DUE_LUA = tracking_script("ledger_take_due.lua")
DISPATCH_LUA = tracking_script("ledger_dispatch.lua")
ENQUEUE_ONE_LUA = tracking_script("tracking_enqueue_one.lua")
TAKE_SCHEDULED_LUA = tracking_script("ledger_take_scheduled.lua")
SCHEDULE_DUE_LUA = tracking_script("schedule_due.lua")
DROP_TEMPLATE_LUA = load_script("campaign_drop_template.lua")
#: Prefix of a scheduled campaign's start in the scheduled index (message ids have none).
START_PREFIX = "start:"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Transition:
    """One message's new state, as recorded by ``finish``."""

    message_id: str
    state: MessageState
    code: int = 0
    reason: str = ""
    ses_message_id: str | None = None
    #: The recipient row, kept for messages not sent so retry-failed can requeue them.
    row: Any = None

    def argv(self) -> list[str]:
        row = "" if self.row is None else json.dumps(self.row, separators=(",", ":"))
        return [
            self.state.value,
            str(self.code),
            self.reason[:1000],
            self.ses_message_id or "",
            row,
        ]


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim`` decided for one message: ``go`` means send it now."""

    message_id: str
    decision: ClaimDecision
    #: For ``BUSY``: how long another worker's lease still runs.
    retry_after_s: float = 0.0
    #: For ``SKIP``: the final state the message is already in.
    skipped_state: MessageState | None = None

    @property
    def go(self) -> bool:
        return self.decision in (ClaimDecision.GO, ClaimDecision.RECOVERED)

    @property
    def recovered(self) -> bool:
        """A previous worker held it and died: it may already have been sent."""
        return self.decision is ClaimDecision.RECOVERED


def parse_claim(message_id: str, raw: Any) -> Claim:
    """The claim script's answer for one message; the only parser of that vocabulary."""
    text = _text(raw)
    if text.startswith("busy:"):
        return Claim(message_id, ClaimDecision.BUSY, int(text[5:]) / 1000.0)
    if text in (ClaimDecision.MISSING, ClaimDecision.STALE):
        return Claim(message_id, ClaimDecision(text))
    if text.startswith("skip:"):
        return Claim(message_id, ClaimDecision.SKIP, skipped_state=MessageState(text[5:]))
    return Claim(message_id, ClaimDecision(text))


def parse_campaign_state(raw: Any) -> CampaignState | None:
    """A campaign state from a script; ``None`` when the record is gone."""
    text = _text(raw)
    return None if text == "missing" else CampaignState(text)


@dataclass(frozen=True, slots=True)
class ClaimReply:
    campaign_state: CampaignState | None
    claims: list[Claim]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A batch to publish, written to the ledger before it is published."""

    batch_id: str
    payload: dict[str, Any]
    #: The countdown it is published with; the sweeper waits this plus redeliver-after.
    delay_s: float = 0.0
    #: Back to the campaign's backlog, for the dispatcher (not published, not due).
    stored: bool = False

    def payload_json(self) -> str:
        return json.dumps(self.payload, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Settlement:
    """What ``finish`` does besides recording transitions, in the same atomic step."""

    #: The lease token of the caller: messages another worker took over are left alone.
    token: str = ""
    #: Our messages claimed but not sent, handed back to ``queued`` (a follow-up has them).
    release: Sequence[str] = ()
    #: The ledger entry this call settles (removed).
    done_batch: str = ""
    #: New ledger entries (follow-up batches) written as the settled one is removed.
    follow_ups: Sequence[LedgerEntry] = ()


@dataclass(frozen=True, slots=True)
class DispatchReply:
    """One campaign as the dispatcher sees it, and the batches it took for the broker."""

    campaign_id: str
    state: CampaignState | None
    #: Batches handed to the broker and not settled yet (the credits in use).
    in_flight: int
    #: Batches stored and not yet handed to the broker.
    backlog: int
    weight: float
    #: Messages not final yet.
    open: int
    #: The sender profile ('' is the unnamed default).
    profile: str = ""
    taken: list[LedgerEntry] = field(default_factory=list)
    #: A scheduled campaign: seconds until it may send (0 once it may, or if cancelled).
    starts_in_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What ``enqueue_single`` did with a single message."""

    #: Recorded now (False: the idempotency key's message was there already).
    new: bool
    state: MessageState
    #: Its ledger entry is still there (so a publish may still be needed).
    in_ledger: bool
    #: Unix ms it waits for (``send_at`` still ahead), else None: do not publish it now.
    waiting_until_ms: int | None = None


@dataclass(frozen=True, slots=True)
class RenewReply:
    campaign_state: CampaignState | None
    #: Message ids another worker took over: never send these.
    lost: list[str]


@dataclass(frozen=True, slots=True)
class MessageRecord:
    message_id: str
    state: MessageState
    email: str | None = None
    attempts: int = 0
    ses_message_id: str | None = None
    code: int = 0
    reason: str = ""
    created_at: float | None = None
    updated_at: float | None = None
    recovered: bool = False
    row: Any = None
    #: Unix time it was scheduled for (``send_email(send_at=...)``), or None.
    send_at: float | None = None
    #: What the sender attached (``send_email(metadata=...)``, or its campaign's); {} if none.
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "state": self.state.value,
            "email": self.email,
            "attempts": self.attempts,
            "ses_message_id": self.ses_message_id,
            "code": self.code,
            "reason": self.reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "recovered": self.recovered,
            "send_at": self.send_at,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    id: str
    state: CampaignState
    total: int
    counts: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    created_at: float | None = None
    finished_at: float | None = None
    enqueued_all: bool = False
    meta: dict[str, str] = field(default_factory=dict)
    #: Batches the sweeper republished (their publish was lost, or their worker died).
    swept: int = 0
    #: Unix time a scheduled campaign starts sending (``send_campaign(send_at=...)``).
    send_at: float | None = None

    @property
    def scheduled(self) -> bool:
        """Waiting for its ``send_at``: nothing of it is sent before then (a cancelled or
        finished campaign is not waiting for anything)."""
        return (
            self.send_at is not None
            and self.send_at > time.time()
            and self.state not in (CampaignState.CANCELLED, CampaignState.COMPLETED)
        )

    @property
    def open(self) -> int:
        """Messages not yet in a final state."""
        return sum(self.counts.get(s, 0) for s in OPEN_STATES)

    @property
    def done(self) -> bool:
        return self.enqueued_all and self.open == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "reason": self.reason,
            "total": self.total,
            **{name: self.counts.get(name, 0) for name in COUNTERS},
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "swept": self.swept,
            "send_at": self.send_at,
            "scheduled": self.scheduled,
            **self.meta,
        }


def _ms_to_s(value: Any) -> float | None:
    return None if value in (None, b"", "") else int(value) / 1000.0


def parse_message(message_id: str, raw: dict[Any, Any]) -> MessageRecord | None:
    if not raw:
        return None
    data = {_text(k): _text(v) for k, v in raw.items()}
    row = data.get("row")
    return MessageRecord(
        message_id=message_id,
        state=MessageState(data.get("state", "queued")),
        email=data.get("email"),
        attempts=int(data.get("attempts", 0)),
        ses_message_id=data.get("ses_message_id") or None,
        code=int(data.get("code") or 0),
        reason=data.get("reason", ""),
        created_at=_ms_to_s(data.get("created_at")),
        updated_at=_ms_to_s(data.get("updated_at")),
        recovered=data.get("recovered") == "1",
        row=json.loads(row) if row else None,
        send_at=_ms_to_s(data.get("send_at")),
        metadata=_metadata(data.get("metadata")),
    )


def _metadata(raw: Any) -> dict[str, Any]:
    """A stored ``metadata`` field (JSON object); {} when absent."""
    if raw in (None, b"", ""):
        return {}
    try:
        value = json.loads(_text(raw))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


_META_FIELDS = ("from", "subject", "mode", "pause_kind", "deferred_reason", "weight", "profile")


def parse_campaign(campaign_id: str, raw: dict[Any, Any]) -> CampaignStatus | None:
    if not raw:
        return None
    data = {_text(k): _text(v) for k, v in raw.items()}
    return CampaignStatus(
        id=campaign_id,
        state=CampaignState(data.get("state", "running")),
        total=int(data.get("total", 0)),
        counts={name: int(data.get(name, 0)) for name in COUNTERS},
        reason=data.get("reason", ""),
        created_at=_ms_to_s(data.get("created_at")),
        finished_at=_ms_to_s(data.get("finished_at")),
        enqueued_all=data.get("enqueued_all") == "1",
        swept=int(data.get("swept") or 0),
        meta={k: data[k] for k in _META_FIELDS if data.get(k)},
        send_at=_ms_to_s(data.get("send_at")),
    )


class _Base:
    def __init__(
        self,
        *,
        key_prefix: str = "sestasks",
        retention_s: int = 30 * 86400,
        redeliver_after_s: float = 7200.0,
    ) -> None:
        self.keys = Keys(key_prefix)
        self.retention_s = retention_s
        #: A ledger entry nobody settled is republished this long after its due time.
        self.redeliver_after_ms = int(redeliver_after_s * 1000)
        #: Picks the timeline bucket ``finish`` records into (tests pin it to an instant).
        self.clock: Callable[[], float] = time.time

    def ttl_for(self, send_at_ms: int | None) -> int:
        """Retention of what waits for ``send_at``: the retention counts from then."""
        if not send_at_ms:
            return self.retention_s
        return self.retention_s + max(0, math.ceil(send_at_ms / 1000 - time.time()))

    def _ledger_keys(self, campaign_id: str) -> list[str]:
        return [
            self.keys.campaign(campaign_id),
            self.keys.not_sent(campaign_id),
            self.keys.batches(campaign_id),
            self.keys.due(campaign_id),
        ]

    def _message_keys(self, campaign_id: str, message_ids: Iterable[str]) -> list[str]:
        prefix = self.keys.message_prefix(campaign_id)
        return [prefix + mid for mid in message_ids]

    def _claim_args(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        lease_s: float,
        token: str,
        batch_id: str,
    ) -> tuple[list[str], list[Any]]:
        keys = self._ledger_keys(campaign_id) + self._message_keys(
            campaign_id, (mid for mid, _, _ in items)
        )
        argv: list[Any] = [
            int(lease_s * 1000),
            token,
            self.retention_s,
            "1" if campaign_id == TRANSACTIONAL else "0",
            batch_id,
        ]
        for _, email, suppressed in items:
            argv += ["1" if suppressed else "0", email]
        return keys, argv

    @staticmethod
    def _parse_claims(items: Sequence[tuple[str, str, bool]], raw: list[Any]) -> ClaimReply:
        claims = [parse_claim(mid, d) for (mid, _, _), d in zip(items, raw[2:], strict=True)]
        return ClaimReply(parse_campaign_state(raw[0]), claims)

    def _finish_args(
        self,
        campaign_id: str,
        outcomes: Sequence[Transition],
        requeue: bool,
        settle: Settlement,
    ) -> tuple[list[str], list[Any]]:
        keys = (
            self._ledger_keys(campaign_id)
            + self._message_keys(campaign_id, (o.message_id for o in outcomes))
            + self._message_keys(campaign_id, settle.release)
            + [self.keys.backlog(campaign_id)]
        )
        bucket = bucket_start(self.clock())
        keys.append(self.keys.timeline(campaign_id, bucket // 3600))
        argv: list[Any] = [
            self.retention_s,
            "requeue" if requeue else "normal",
            settle.token,
            len(outcomes),
            len(settle.release),
            settle.done_batch,
            len(settle.follow_ups),
            self.redeliver_after_ms,
            bucket,
            KEEP_HOURS * 3600,
        ]
        single = campaign_id == TRANSACTIONAL
        for outcome in outcomes:
            # A single message's row would be its whole body: never kept (privacy.md),
            # whichever lane it was sent in.
            argv += (replace(outcome, row=None) if single else outcome).argv()
        for entry in settle.follow_ups:
            delay_ms = int(entry.delay_s * 1000)
            if entry.stored:
                # The standing campaign has no dispatcher: its hand-back is due now and
                # indexed for the scheduler (``_index_hand_backs``).
                delay_ms = -2 if single else -1
            argv += [entry.batch_id, entry.payload_json(), delay_ms]
        return keys, argv

    def _hand_backs(self, campaign_id: str, settle: Settlement) -> list[str]:
        """Single messages handed back unpublished: the scheduler publishes them now."""
        if campaign_id != TRANSACTIONAL:
            return []
        return [e.batch_id for e in settle.follow_ups if e.stored]

    def _ses_index(self, outcomes: Sequence[Transition]) -> list[tuple[str, str]]:
        """SES id -> message id entries, written after ``finish`` (a key of its own slot)."""
        return [
            (self.keys.ses_id(o.ses_message_id), o.message_id) for o in outcomes if o.ses_message_id
        ]

    def _park_args(
        self,
        campaign_id: str,
        payload: dict[str, Any],
        message_ids: Sequence[str],
        reason: str,
        token: str,
    ) -> tuple[list[str], list[Any]]:
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.parked(campaign_id),
            self.keys.not_sent(campaign_id),
            *self._message_keys(campaign_id, message_ids),
        ]
        argv = [
            self.retention_s,
            json.dumps(payload, separators=(",", ":")),
            reason,
            token,
        ]
        return keys, argv

    def _control_args(
        self, campaign_id: str, action: str, reason: str, kind: str
    ) -> tuple[list[str], list[Any]]:
        return [self.keys.campaign(campaign_id)], [action, reason, kind]


def _control_result(campaign_id: str, raw: list[Any]) -> tuple[str, str]:
    result, state = _text(raw[0]), _text(raw[1])
    if result == "missing":
        raise CampaignError(f"no campaign {campaign_id!r}")
    return result, state


class StatusStore(_Base):
    """Synchronous store for producers, the CLI and tests."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "sestasks",
        retention_s: int = 30 * 86400,
        redeliver_after_s: float = 7200.0,
    ) -> None:
        super().__init__(
            key_prefix=key_prefix, retention_s=retention_s, redeliver_after_s=redeliver_after_s
        )
        self.redis = client
        self._claim = client.register_script(CLAIM_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._park = client.register_script(PARK_LUA)
        self._resume = client.register_script(RESUME_LUA)
        self._control = client.register_script(CONTROL_LUA)
        self._cancel_parked = client.register_script(CANCEL_PARKED_LUA)
        self._enqueue_one = client.register_script(ENQUEUE_ONE_LUA)

    # Campaigns -------------------------------------------------------------------------

    def create_campaign(
        self,
        campaign_id: str,
        *,
        template: dict[str, Any] | None = None,
        meta: dict[str, str] | None = None,
        send_at_ms: int | None = None,
    ) -> None:
        """Create the campaign record; refuse an id already used (idempotent producers).

        With ``send_at_ms`` the dispatcher hands out none of its batches before then, and
        its record and template are kept that much longer (the retention counts from then).
        """
        if not CAMPAIGN_ID_RE.match(campaign_id):
            raise CampaignError(
                f"campaign id {campaign_id!r}: use 1-64 ASCII letters, digits, '_' or '-'"
            )
        key = self.keys.campaign(campaign_id)
        now_ms = int(time.time() * 1000)
        fields: dict[str, Any] = {
            "state": CampaignState.ENQUEUEING.value,
            "total": 0,
            "created_at": now_ms,
            "enqueued_all": 0,
            **{name: 0 for name in COUNTERS},
            **(meta or {}),
            **({"send_at": int(send_at_ms)} if send_at_ms else {}),
        }
        ttl = self.ttl_for(send_at_ms)
        if not self.redis.hsetnx(key, "id", campaign_id):
            raise CampaignError(f"campaign {campaign_id!r} already exists")
        # On the sweeper's list first: a producer dying after this leaves nothing unswept.
        # (Other slots than the campaign's, for Redis Cluster: separate commands.)
        self.redis.zadd(self.keys.active(), {campaign_id: now_ms})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's Mapping is invariant
        pipe.expire(key, ttl)
        if template is not None:
            pipe.set(self.keys.template(campaign_id), json.dumps(template), ex=ttl)
        pipe.execute()
        self.redis.zadd(self.keys.campaigns_index(), {campaign_id: now_ms})
        if send_at_ms:
            self.schedule(START_PREFIX + campaign_id, send_at_ms)

    def add_queued(self, campaign_id: str, count: int, pipe: Any = None) -> None:
        """Count ``count`` new queued messages; pass the pipeline that enqueues them."""
        target = pipe if pipe is not None else self.redis
        key = self.keys.campaign(campaign_id)
        target.hincrby(key, "total", count)
        target.hincrby(key, "queued", count)

    def register_batch(self, campaign_id: str, entry: LedgerEntry, pipe: Any = None) -> None:
        """Write a batch to the ledger before publishing it: a lost publish gets swept."""
        target = pipe if pipe is not None else self.redis
        due_ms = int(time.time() * 1000 + entry.delay_s * 1000) + self.redeliver_after_ms
        target.hset(self.keys.batches(campaign_id), entry.batch_id, entry.payload_json())
        target.zadd(self.keys.due(campaign_id), {entry.batch_id: due_ms})
        target.expire(self.keys.batches(campaign_id), self.retention_s)
        target.expire(self.keys.due(campaign_id), self.retention_s)

    def store_batch(
        self, campaign_id: str, entry: LedgerEntry, seq: int, pipe: Any, *, ttl_s: int = 0
    ) -> None:
        """Keep a batch for the dispatcher: in the ledger and the backlog, not yet published.

        Not due: the sweeper never republishes a batch the dispatcher has not handed out.
        ``ttl_s``: a scheduled campaign's (``ttl_for``); default the retention.
        """
        ttl = ttl_s or self.retention_s
        pipe.hset(self.keys.batches(campaign_id), entry.batch_id, entry.payload_json())
        pipe.zadd(self.keys.backlog(campaign_id), {entry.batch_id: seq}, nx=True)
        pipe.expire(self.keys.batches(campaign_id), ttl)
        pipe.expire(self.keys.backlog(campaign_id), ttl)

    # Scheduled work --------------------------------------------------------------------

    def schedule(self, member: str, at_ms: int) -> None:
        """Index ``member`` (a single message's id, or ``start:<campaign>``) for the fleet's
        scheduler at ``at_ms`` and wake it, so it waits for the earliest due time."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.scheduled(), {member: int(at_ms)})
        pipe.lpush(self.keys.schedule_kick(), 1)
        pipe.ltrim(self.keys.schedule_kick(), 0, 0)
        pipe.execute()

    def unschedule_start(self, campaign_id: str) -> None:
        self.redis.zrem(self.keys.scheduled(), START_PREFIX + campaign_id)

    def scheduled_count(self) -> int:
        """Entries waiting in the scheduler's index (messages and campaign starts)."""
        return int(self.redis.zcard(self.keys.scheduled()))

    def kick_dispatcher(self, campaign_id: str | None = None) -> None:
        """Wake the fleet's dispatcher now instead of at its next poll.

        With ``campaign_id``, also put it (back) on the active list: the sweeper may have
        retired it (cancelled, ledger empty) while its producer was still storing.
        """
        pipe = self.redis.pipeline(transaction=False)
        if campaign_id is not None:
            pipe.zadd(self.keys.active(), {campaign_id: int(time.time() * 1000)}, nx=True)
        pipe.lpush(self.keys.dispatch_kick(), 1)
        pipe.ltrim(self.keys.dispatch_kick(), 0, 0)
        pipe.execute()

    def set_weight(self, campaign_id: str, weight: float) -> None:
        """Change a running campaign's share of the rate (takes effect at the next dispatch)."""
        self.campaign_status(campaign_id)  # raises for an unknown campaign
        self.redis.hset(self.keys.campaign(campaign_id), "weight", repr(float(weight)))
        self.kick_dispatcher()

    def backlog_size(self, campaign_id: str) -> int:
        return int(self.redis.zcard(self.keys.backlog(campaign_id)))

    def activate(self, campaign_id: str) -> None:
        """Put a campaign (back) on the sweeper's list before writing ledger entries."""
        self.redis.zadd(self.keys.active(), {campaign_id: int(time.time() * 1000)}, nx=True)

    def mark_due_now(self, campaign_id: str, batch_ids: Sequence[str]) -> None:
        """A publish failed: let the sweeper republish these at its next pass."""
        if batch_ids:
            self.redis.zadd(self.keys.due(campaign_id), dict.fromkeys(batch_ids, 0), xx=True)

    def enqueue_one(
        self, message_id: str, email: str, payload: dict[str, Any]
    ) -> tuple[bool, MessageState, bool]:
        """Record a single message and its ledger entry; (new, state, entry still there)."""
        done = self.enqueue_single(message_id, email, payload)
        return done.new, done.state, done.in_ledger

    def enqueue_single(
        self,
        message_id: str,
        email: str,
        payload: dict[str, Any],
        *,
        send_at_ms: int | None = None,
    ) -> Enqueued:
        """Record a single message and its ledger entry, to publish now or at ``send_at_ms``.

        A message still waiting for its time is indexed for the scheduler here (again for
        an existing one: a producer that died before indexing it is repaired by a retry);
        the caller must not publish it.
        """
        keys = [
            self.keys.campaign(TRANSACTIONAL),
            self.keys.batches(TRANSACTIONAL),
            self.keys.due(TRANSACTIONAL),
            self.keys.message(message_id),
        ]
        raw = self._enqueue_one(
            keys=keys,
            args=[
                email,
                json.dumps(payload, separators=(",", ":")),
                self.redeliver_after_ms,
                self.retention_s,
                int(send_at_ms or 0),
            ],
        )
        new = _text(raw[0]) == "new"
        if new:
            self.redis.zadd(self.keys.active(), {TRANSACTIONAL: 0}, nx=True)
        waiting = _text(raw[3]) if len(raw) > 3 else ""
        done = Enqueued(
            new,
            MessageState(_text(raw[1])),
            _text(raw[2]) == "1",
            int(waiting) if waiting else None,
        )
        if done.waiting_until_ms is not None and done.state is MessageState.QUEUED:
            self.schedule(message_id, done.waiting_until_ms)
        return done

    def enqueued_upto(self, campaign_id: str) -> int:
        """Rows below this sequence number are published or recorded (resume point)."""
        raw = self.redis.hget(self.keys.campaign(campaign_id), "enqueued_upto")
        return int(raw or 0)

    def set_enqueued_upto(self, campaign_id: str, seq: int, pipe: Any = None) -> None:
        target = pipe if pipe is not None else self.redis
        target.hset(self.keys.campaign(campaign_id), "enqueued_upto", seq)

    def finish_enqueue(self, campaign_id: str) -> CampaignStatus:
        """All batches are in the broker: the campaign runs, or completes if nothing is open."""
        keys, argv = self._control_args(campaign_id, "enqueued", "", "")
        _control_result(campaign_id, self._control(keys=keys, args=argv))
        return self.campaign_status(campaign_id)

    def campaign_status(self, campaign_id: str) -> CampaignStatus:
        status = parse_campaign(campaign_id, self.redis.hgetall(self.keys.campaign(campaign_id)))
        if status is None:
            raise CampaignError(f"no campaign {campaign_id!r}")
        return status

    def template(self, campaign_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.template(campaign_id))
        return json.loads(raw) if raw else None

    def active_campaign_ids(self) -> list[str]:
        """Campaigns that may still have work (the sweeper's and dispatcher's list)."""
        return [_text(c) for c in self.redis.zrange(self.keys.active(), 0, -1)]

    def list_campaigns(self, limit: int = 50) -> list[str]:
        ids = self.redis.zrevrange(self.keys.campaigns_index(), 0, limit - 1)
        return [_text(i) for i in ids]

    def pause(
        self, campaign_id: str, reason: str = "paused by user", *, kind: str = "user"
    ) -> bool:
        """Pause an open campaign. Workers stop between messages and park what is left.

        The standing transactional campaign may be paused too: its messages are deferred
        and retried until it is resumed.
        """
        action = "pause" if kind == "user" else "system-pause"
        keys, argv = self._control_args(campaign_id, action, reason, kind)
        result, state = _control_result(campaign_id, self._control(keys=keys, args=argv))
        if result == "refused":
            raise CampaignError(f"campaign {campaign_id!r} is {state}")
        return result == "ok"

    def resume(self, campaign_id: str) -> list[LedgerEntry]:
        """Set the campaign running; its parked batches move to the ledger, to be published."""
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.parked(campaign_id),
            self.keys.batches(campaign_id),
            self.keys.due(campaign_id),
        ]
        self.activate(campaign_id)
        raw = self._resume(keys=keys, args=[self.redeliver_after_ms, self.retention_s])
        self.activate(campaign_id)  # again: the sweeper may have retired it in between
        old = _text(raw[0])
        if old == "missing":
            raise CampaignError(f"no campaign {campaign_id!r}")
        if old != CampaignState.PAUSED.value:
            raise CampaignError(f"campaign {campaign_id!r} is {old}, not paused")
        pairs = raw[2:]
        return [
            LedgerEntry(_text(pairs[i]), json.loads(_text(pairs[i + 1])))
            for i in range(0, len(pairs), 2)
        ]

    def cancel(self, campaign_id: str) -> int:
        """Cancel: parked messages end ``cancelled`` now, queued ones when a worker sees them."""
        if campaign_id == TRANSACTIONAL:
            raise CampaignError(
                "the transactional campaign cannot be cancelled: it holds every single "
                "message; pause it to hold them back"
            )
        keys, argv = self._control_args(campaign_id, "cancel", "cancelled by user", "user")
        result, state = _control_result(campaign_id, self._control(keys=keys, args=argv))
        if result == "refused":
            raise CampaignError(f"campaign {campaign_id!r} is already {state}")
        self.unschedule_start(campaign_id)  # its start no longer wakes anybody
        return self.cancel_parked(campaign_id)

    def cancel_parked(self, campaign_id: str) -> int:
        """End every parked batch of a cancelled campaign, one atomic step per batch."""
        parked_key = self.keys.parked(campaign_id)
        total = 0
        while (head := self.redis.lindex(parked_key, 0)) is not None:
            payload = json.loads(_text(head))
            keys = [
                self.keys.campaign(campaign_id),
                parked_key,
                self.keys.not_sent(campaign_id),
                *self._message_keys(campaign_id, payload.get("message_ids", [])),
            ]
            total += int(self._cancel_parked(keys=keys, args=[self.retention_s, head]))
        return total

    def not_sent(self, campaign_id: str) -> Iterator[MessageRecord]:
        """Every message of the campaign that was not sent, streamed."""
        key = self.keys.not_sent(campaign_id)
        batch: list[str] = []
        for member in self.redis.sscan_iter(key, count=500):
            batch.append(_text(member))
            if len(batch) >= 500:
                yield from self._records(batch)
                batch = []
        if batch:
            yield from self._records(batch)

    def _records(self, message_ids: Sequence[str]) -> Iterator[MessageRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for message_id in message_ids:
            pipe.hgetall(self.keys.message(message_id))
        for message_id, raw in zip(message_ids, pipe.execute(), strict=True):
            record = parse_message(message_id, raw)
            if record is not None:
                yield record

    def ledger_size(self, campaign_id: str) -> int:
        """Batches not yet settled (published, running, or waiting to be swept)."""
        return int(self.redis.hlen(self.keys.batches(campaign_id)))

    def in_flight(self, campaign_id: str) -> int:
        """Batches handed to the broker (or its follow-ups) and not settled yet."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hlen(self.keys.batches(campaign_id))
        pipe.zcard(self.keys.backlog(campaign_id))
        stored, backlog = pipe.execute()
        return int(stored) - int(backlog)

    # Messages --------------------------------------------------------------------------

    def message_id_for_ses_id(self, ses_message_id: str) -> str | None:
        raw = self.redis.get(self.keys.ses_id(ses_message_id))
        return None if raw is None else _text(raw)

    def message_status(self, message_id: str) -> MessageRecord | None:
        """One message's record. A campaign message with no record yet is ``queued``."""
        try:
            key = self.keys.message(message_id)
        except ValueError:
            return None
        record = parse_message(message_id, self.redis.hgetall(key))
        if record is None and self.redis.exists(self.keys.campaign(campaign_of(message_id))):
            record = MessageRecord(message_id=message_id, state=MessageState.QUEUED)
        if record is not None and not record.metadata and campaign_of(message_id) != TRANSACTIONAL:
            raw = self.redis.hget(self.keys.campaign(campaign_of(message_id)), "metadata")
            record = replace(record, metadata=_metadata(raw))  # the campaign's
        return record

    def claim(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        *,
        lease_s: float,
        token: str,
        batch_id: str = "",
    ) -> ClaimReply:
        keys, argv = self._claim_args(campaign_id, items, lease_s, token, batch_id)
        return self._parse_claims(items, self._claim(keys=keys, args=argv))

    def finish(
        self,
        campaign_id: str,
        outcomes: Sequence[Transition],
        *,
        requeue: bool = False,
        settle: Settlement = Settlement(),
    ) -> CampaignState | None:
        outcomes = list(outcomes)
        if settle.follow_ups:
            self.activate(campaign_id)
        keys, argv = self._finish_args(campaign_id, outcomes, requeue, settle)
        raw = self._finish(keys=keys, args=argv)
        if settle.follow_ups:  # again: the sweeper may have retired it in between
            self.activate(campaign_id)
        for key, mid in self._ses_index(outcomes):
            self.redis.set(key, mid, ex=self.retention_s)
        for batch_id in self._hand_backs(campaign_id, settle):
            self.schedule(batch_id, 0)
        return parse_campaign_state(raw[0])


class AsyncStatusStore(_Base):
    """The worker's view: the per-batch operations, on an asyncio Redis client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "sestasks",
        retention_s: int = 30 * 86400,
        redeliver_after_s: float = 7200.0,
    ) -> None:
        super().__init__(
            key_prefix=key_prefix, retention_s=retention_s, redeliver_after_s=redeliver_after_s
        )
        self.redis = client
        self._claim = client.register_script(CLAIM_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._park = client.register_script(PARK_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._control = client.register_script(CONTROL_LUA)
        self._take_due = client.register_script(TAKE_DUE_LUA)
        self._dispatch = client.register_script(DISPATCH_LUA)
        self._take_scheduled = client.register_script(TAKE_SCHEDULED_LUA)
        self._schedule_due = client.register_script(SCHEDULE_DUE_LUA)
        self._drop_template = client.register_script(DROP_TEMPLATE_LUA)

    async def claim(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        *,
        lease_s: float,
        token: str,
        batch_id: str = "",
    ) -> ClaimReply:
        keys, argv = self._claim_args(campaign_id, items, lease_s, token, batch_id)
        return self._parse_claims(items, await self._claim(keys=keys, args=argv))

    async def finish(
        self,
        campaign_id: str,
        outcomes: Sequence[Transition],
        *,
        requeue: bool = False,
        settle: Settlement = Settlement(),
    ) -> CampaignState | None:
        outcomes = list(outcomes)
        keys, argv = self._finish_args(campaign_id, outcomes, requeue, settle)
        raw = await self._finish(keys=keys, args=argv)
        index = self._ses_index(outcomes)
        hand_backs = self._hand_backs(campaign_id, settle)
        if index or settle.follow_ups:
            pipe = self.redis.pipeline(transaction=False)
            for key, mid in index:
                pipe.set(key, mid, ex=self.retention_s)
            if settle.follow_ups:  # keep the campaign on the sweeper's list
                pipe.zadd(self.keys.active(), {campaign_id: int(time.time() * 1000)}, nx=True)
            if hand_backs:  # due now: the scheduler publishes them (the sweeper if not)
                pipe.zadd(self.keys.scheduled(), dict.fromkeys(hand_backs, 0))
                pipe.lpush(self.keys.schedule_kick(), 1)
                pipe.ltrim(self.keys.schedule_kick(), 0, 0)
            await pipe.execute()
        return parse_campaign_state(raw[0])

    async def park(
        self,
        campaign_id: str,
        payload: dict[str, Any],
        message_ids: Sequence[str],
        reason: str,
        token: str,
    ) -> CampaignState | None:
        """Park a paused campaign's messages; returns the campaign state (paused if parked)."""
        keys, argv = self._park_args(campaign_id, payload, message_ids, reason, token)
        return parse_campaign_state(await self._park(keys=keys, args=argv))

    async def renew(
        self,
        campaign_id: str,
        message_ids: Sequence[str],
        *,
        lease_s: float,
        token: str,
        batch_id: str = "",
    ) -> RenewReply:
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.due(campaign_id),
            *self._message_keys(campaign_id, message_ids),
        ]
        raw = await self._renew(keys=keys, args=[int(lease_s * 1000), token, batch_id])
        lost = [message_ids[int(i) - 1] for i in raw[2:]]
        return RenewReply(parse_campaign_state(raw[0]), lost)

    async def pause(self, campaign_id: str, reason: str, *, kind: str) -> None:
        """Pause by the system (endpoint failure): only a running campaign is paused."""
        keys, argv = self._control_args(campaign_id, "system-pause", reason, kind)
        await self._control(keys=keys, args=argv)

    async def set_campaign_fields(self, campaign_id: str, **fields: str) -> None:
        await self.redis.hset(self.keys.campaign(campaign_id), mapping=fields)  # type: ignore[arg-type]

    async def template(self, campaign_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.template(campaign_id))
        return json.loads(raw) if raw else None

    async def suppressed(self, emails: Sequence[str]) -> list[bool]:
        """Whether each of ``emails`` is on the suppression list, looked up by its canonical
        form (Punycode domain, lower case) as the list is written, so a unicode recipient
        matches the Punycode address SES reported and the other way round."""
        if not emails:
            return []
        fields = [lookup_fields(e) for e in emails]
        raw = await self.redis.hmget(self.keys.suppression(), [f for fs in fields for f in fs])
        found, at = [], 0
        for fs in fields:
            found.append(any(v is not None for v in raw[at : at + len(fs)]))
            at += len(fs)
        return found

    # The sweeper -----------------------------------------------------------------------

    async def active_campaigns(self, *, page: int = 1000) -> list[str]:
        """Every campaign on the sweeper's list (read a page at a time)."""
        out: list[str] = []
        start = 0
        while True:
            ids = await self.redis.zrange(self.keys.active(), start, start + page - 1)
            out += [_text(c) for c in ids]
            if len(ids) < page:
                return out
            start += page

    async def take_due(
        self, campaign_id: str, *, limit: int
    ) -> tuple[CampaignState | None, list[LedgerEntry]]:
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.batches(campaign_id),
            self.keys.due(campaign_id),
        ]
        standing = "1" if campaign_id == TRANSACTIONAL else "0"
        raw = await self._take_due(keys=keys, args=[limit, self.redeliver_after_ms, standing])
        pairs = raw[1:]
        entries = [
            LedgerEntry(_text(pairs[i]), json.loads(_text(pairs[i + 1])))
            for i in range(0, len(pairs), 2)
        ]
        return parse_campaign_state(raw[0]), entries

    # The dispatcher ---------------------------------------------------------------------

    async def dispatch(
        self, campaign_id: str, take: int, *, unclaimed_after_s: float
    ) -> DispatchReply:
        """Count a campaign's credits in use and take up to ``take`` stored batches."""
        k = self.keys
        keys = [
            k.campaign(campaign_id),
            k.batches(campaign_id),
            k.due(campaign_id),
            k.backlog(campaign_id),
            k.dispatched(campaign_id),
        ]
        raw = await self._dispatch(
            keys=keys, args=[take, int(unclaimed_after_s * 1000), self.retention_s]
        )
        pairs = raw[7:]
        return DispatchReply(
            campaign_id,
            parse_campaign_state(raw[0]),
            int(raw[1]),
            int(raw[2]),
            float(_text(raw[3])),
            int(raw[4]),
            _text(raw[5]),
            [
                LedgerEntry(_text(pairs[i]), json.loads(_text(pairs[i + 1])))
                for i in range(0, len(pairs), 2)
            ],
            int(raw[6]) / 1000.0,
        )

    async def kick_dispatcher(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.keys.dispatch_kick(), 1)
        pipe.ltrim(self.keys.dispatch_kick(), 0, 0)
        await pipe.execute()

    # The scheduler ----------------------------------------------------------------------

    async def schedule_due(self, *, limit: int) -> tuple[float | None, list[str]]:
        """Index members due now (at most ``limit``) and the seconds until the next one
        after them (None: nothing else is scheduled), by the server's clock."""
        raw = await self._schedule_due(keys=[self.keys.scheduled()], args=[limit])
        next_in_ms = int(raw[0])
        return (None if next_in_ms < 0 else next_in_ms / 1000.0), [_text(m) for m in raw[1:]]

    async def take_scheduled(
        self, campaign_id: str, batch_ids: Sequence[str]
    ) -> tuple[CampaignState | None, list[LedgerEntry], list[str]]:
        """Take the due entries among ``batch_ids``; returns (state, entries to publish,
        ids gone or already taken: nothing to do)."""
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.batches(campaign_id),
            self.keys.due(campaign_id),
        ]
        raw = await self._take_scheduled(keys=keys, args=[self.redeliver_after_ms, *batch_ids])
        pairs = raw[1:]
        entries, gone = [], []
        for i in range(0, len(pairs), 2):
            batch_id, payload = _text(pairs[i]), _text(pairs[i + 1])
            if payload:
                entries.append(LedgerEntry(batch_id, json.loads(payload)))
            else:
                gone.append(batch_id)
        return parse_campaign_state(raw[0]), entries, gone

    async def unschedule(self, members: Sequence[str]) -> None:
        if members:
            await self.redis.zrem(self.keys.scheduled(), *members)

    async def retire_if_settled(self, campaign_id: str) -> bool:
        """Drop a finished campaign from the sweeper's list once its ledger is empty."""
        if campaign_id == TRANSACTIONAL:
            return False
        state, size = await asyncio.gather(
            self.redis.hget(self.keys.campaign(campaign_id), "state"),
            self.redis.hlen(self.keys.batches(campaign_id)),
        )
        done = state is None or _text(state) in ("completed", "cancelled")
        if not (done and int(size) == 0):
            return False
        await self.redis.zrem(self.keys.active(), campaign_id)
        # retry-failed may have written an entry meanwhile (it adds the campaign first,
        # then writes): look again after removing, and put it back if so.
        if int(await self.redis.hlen(self.keys.batches(campaign_id))):
            await self.redis.zadd(self.keys.active(), {campaign_id: 0})
            return False
        return True

    async def drop_template_if_done(self, campaign_id: str) -> bool:
        """Delete the campaign's bodies once it completed with nothing to retry."""
        keys = [self.keys.campaign(campaign_id), self.keys.template(campaign_id)]
        return bool(await self._drop_template(keys=keys))

    async def mark_due_now(self, campaign_id: str, batch_ids: Sequence[str]) -> None:
        if batch_ids:
            await self.redis.zadd(self.keys.due(campaign_id), dict.fromkeys(batch_ids, 0), xx=True)
