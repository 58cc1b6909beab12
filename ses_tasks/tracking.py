"""The status store: one record per message, counters per campaign, all in Redis.

Every state change is one Lua script that updates the message record and moves one unit
between the campaign's per-state counters, so the counters always add up to ``total``.
Message records are written lazily: a message of a campaign with no record yet is
``queued``. That keeps enqueueing a million recipients at one counter update per batch.

Producers and the CLI use the synchronous ``StatusStore``; workers, which run an event
loop, use ``AsyncStatusStore`` for the per-batch hot path (claim, finish, park).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis

from .errors import CampaignError
from .keys import CAMPAIGN_ID_RE, TRANSACTIONAL, Keys, campaign_of
from .states import CampaignState, MessageState

__all__ = [
    "COUNTERS",
    "AsyncStatusStore",
    "CampaignStatus",
    "Claim",
    "MessageRecord",
    "StatusStore",
    "Transition",
]

#: Per-state counters of a campaign, in the order status output shows them.
COUNTERS = tuple(state.value for state in MessageState)


def _script(name: str) -> str:
    return resources.files("ses_tasks").joinpath("lua", name).read_text(encoding="utf-8")


CLAIM_LUA = _script("tracking_claim.lua")
FINISH_LUA = _script("tracking_finish.lua")
PARK_LUA = _script("tracking_park.lua")
RESUME_LUA = _script("tracking_resume.lua")


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
            self.message_id,
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
    decision: str
    #: For ``busy``: how long another worker's lease still runs.
    retry_after_s: float = 0.0

    @property
    def go(self) -> bool:
        return self.decision in ("go", "go:recovered")

    @property
    def recovered(self) -> bool:
        """A previous worker held it and died: it may already have been sent."""
        return self.decision == "go:recovered"


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

    @property
    def open(self) -> int:
        """Messages not yet in a final state."""
        return sum(self.counts.get(s, 0) for s in ("queued", "sending", "retrying", "deferred"))

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
    )


_META_FIELDS = ("from", "subject", "mode", "pause_kind", "deferred_reason")


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
        meta={k: data[k] for k in _META_FIELDS if data.get(k)},
    )


class _Base:
    def __init__(self, *, key_prefix: str = "sestasks", retention_s: int = 30 * 86400) -> None:
        self.keys = Keys(key_prefix)
        self.retention_s = retention_s

    def _claim_args(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        lease_s: float,
        token: str,
    ) -> tuple[list[str], list[Any]]:
        keys = [self.keys.campaign(campaign_id), self.keys.not_sent(campaign_id)]
        argv: list[Any] = [
            self.keys.message_prefix(campaign_id),
            int(lease_s * 1000),
            token,
            self.retention_s,
            "1" if campaign_id == TRANSACTIONAL else "0",
        ]
        for message_id, email, suppressed in items:
            argv += [message_id, "1" if suppressed else "0", email]
        return keys, argv

    @staticmethod
    def _parse_claims(
        items: Sequence[tuple[str, str, bool]], raw: list[Any]
    ) -> tuple[str, list[Claim]]:
        state = _text(raw[0])
        claims = []
        for (message_id, _, _), decision in zip(items, raw[2:], strict=True):
            text = _text(decision)
            if text.startswith("busy:"):
                claims.append(Claim(message_id, "busy", int(text[5:]) / 1000.0))
            else:
                claims.append(Claim(message_id, text))
        return state, claims

    def _finish_args(
        self, campaign_id: str, outcomes: Iterable[Transition], requeue: bool
    ) -> tuple[list[str], list[Any]]:
        keys = [self.keys.campaign(campaign_id), self.keys.not_sent(campaign_id)]
        argv: list[Any] = [
            self.keys.message_prefix(campaign_id),
            self.retention_s,
            "requeue" if requeue else "normal",
            self.keys.ses_id_prefix(),
        ]
        for outcome in outcomes:
            argv += outcome.argv()
        return keys, argv

    def _park_args(
        self, campaign_id: str, payload: dict[str, Any], message_ids: Sequence[str], reason: str
    ) -> tuple[list[str], list[Any]]:
        keys = [
            self.keys.campaign(campaign_id),
            self.keys.parked(campaign_id),
            self.keys.not_sent(campaign_id),
        ]
        argv = [
            self.keys.message_prefix(campaign_id),
            self.retention_s,
            json.dumps(payload, separators=(",", ":")),
            reason,
            *message_ids,
        ]
        return keys, argv


class StatusStore(_Base):
    """Synchronous store for producers, the CLI and tests."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "sestasks",
        retention_s: int = 30 * 86400,
    ) -> None:
        super().__init__(key_prefix=key_prefix, retention_s=retention_s)
        self.redis = client
        self._claim = client.register_script(CLAIM_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._park = client.register_script(PARK_LUA)
        self._resume = client.register_script(RESUME_LUA)

    # Campaigns -------------------------------------------------------------------------

    def create_campaign(
        self,
        campaign_id: str,
        *,
        template: dict[str, Any] | None = None,
        meta: dict[str, str] | None = None,
    ) -> None:
        """Create the campaign record; refuse an id already used (idempotent producers)."""
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
        }
        if not self.redis.hsetnx(key, "id", campaign_id):
            raise CampaignError(f"campaign {campaign_id!r} already exists")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's Mapping is invariant
        pipe.expire(key, self.retention_s)
        if template is not None:
            pipe.set(self.keys.template(campaign_id), json.dumps(template), ex=self.retention_s)
        pipe.zadd(self.keys.campaigns_index(), {campaign_id: now_ms})
        pipe.execute()

    def ensure_transactional(self) -> None:
        """The standing campaign of single messages: created once, never completes."""
        key = self.keys.campaign(TRANSACTIONAL)
        if self.redis.hsetnx(key, "id", TRANSACTIONAL):
            self.redis.hset(
                key,
                mapping={
                    "state": CampaignState.RUNNING.value,
                    "total": 0,
                    "created_at": int(time.time() * 1000),
                    "enqueued_all": 0,
                    **{name: 0 for name in COUNTERS},
                },
            )

    def add_queued(self, campaign_id: str, count: int, pipe: Any = None) -> None:
        """Count ``count`` new queued messages; pass the pipeline that enqueues them."""
        target = pipe if pipe is not None else self.redis
        key = self.keys.campaign(campaign_id)
        target.hincrby(key, "total", count)
        target.hincrby(key, "queued", count)

    def add_message(self, message_id: str, email: str) -> bool:
        """Record a single message as queued; False if that id was already recorded."""
        campaign_id = campaign_of(message_id)
        key = self.keys.message(message_id)
        now_ms = int(time.time() * 1000)
        if not self.redis.hsetnx(key, "state", MessageState.QUEUED.value):
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"email": email, "created_at": now_ms, "updated_at": now_ms})
        pipe.expire(key, self.retention_s)
        self.add_queued(campaign_id, 1, pipe)
        pipe.execute()
        return True

    def enqueued_upto(self, campaign_id: str) -> int:
        """Rows below this sequence number are published or recorded (resume point)."""
        raw = self.redis.hget(self.keys.campaign(campaign_id), "enqueued_upto")
        return int(raw or 0)

    def set_enqueued_upto(self, campaign_id: str, seq: int) -> None:
        self.redis.hset(self.keys.campaign(campaign_id), "enqueued_upto", seq)

    def finish_enqueue(self, campaign_id: str) -> CampaignStatus:
        """All batches are in the broker: the campaign runs, or completes if nothing is open."""
        key = self.keys.campaign(campaign_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, "enqueued_all", 1)
        pipe.hget(key, "state")
        _, state = pipe.execute()
        if _text(state) == CampaignState.ENQUEUEING.value:
            self.redis.hset(key, "state", CampaignState.RUNNING.value)
        self.finish(campaign_id, [])  # marks completed when everything is already final
        return self.campaign_status(campaign_id)

    def campaign_status(self, campaign_id: str) -> CampaignStatus:
        status = parse_campaign(campaign_id, self.redis.hgetall(self.keys.campaign(campaign_id)))
        if status is None:
            raise CampaignError(f"no campaign {campaign_id!r}")
        return status

    def template(self, campaign_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.template(campaign_id))
        return json.loads(raw) if raw else None

    def list_campaigns(self, limit: int = 50) -> list[str]:
        ids = self.redis.zrevrange(self.keys.campaigns_index(), 0, limit - 1)
        return [_text(i) for i in ids]

    def set_campaign_state(
        self, campaign_id: str, state: CampaignState, reason: str = "", *, kind: str = "user"
    ) -> None:
        key = self.keys.campaign(campaign_id)
        if not self.redis.exists(key):
            raise CampaignError(f"no campaign {campaign_id!r}")
        self.redis.hset(key, mapping={"state": state.value, "reason": reason, "pause_kind": kind})

    def pause(
        self, campaign_id: str, reason: str = "paused by user", *, kind: str = "user"
    ) -> bool:
        """Pause a running campaign. Workers stop between messages and park what is left."""
        status = self.campaign_status(campaign_id)
        if status.state in (CampaignState.CANCELLED, CampaignState.COMPLETED):
            raise CampaignError(f"campaign {campaign_id!r} is {status.state.value}")
        if status.state is CampaignState.PAUSED:
            return False
        self.set_campaign_state(campaign_id, CampaignState.PAUSED, reason, kind=kind)
        return True

    def resume(self, campaign_id: str) -> list[dict[str, Any]]:
        """Set the campaign running again and return its parked batches for re-enqueueing."""
        raw = self._resume(keys=[self.keys.campaign(campaign_id), self.keys.parked(campaign_id)])
        old = _text(raw[0])
        if old == "missing":
            raise CampaignError(f"no campaign {campaign_id!r}")
        if old != CampaignState.PAUSED.value:
            raise CampaignError(f"campaign {campaign_id!r} is {old}, not paused")
        return [json.loads(_text(item)) for item in raw[1:]]

    def cancel(self, campaign_id: str) -> int:
        """Cancel: parked messages end ``cancelled`` now, queued ones when a worker sees them."""
        status = self.campaign_status(campaign_id)
        if status.state is CampaignState.COMPLETED:
            raise CampaignError(f"campaign {campaign_id!r} is already completed")
        self.set_campaign_state(campaign_id, CampaignState.CANCELLED, "cancelled by user")
        parked_key = self.keys.parked(campaign_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(parked_key, 0, -1)
        pipe.delete(parked_key)
        parked, _ = pipe.execute()
        outcomes = [
            Transition(item["message_ids"][i], MessageState.CANCELLED, reason="campaign cancelled")
            for item in (json.loads(_text(p)) for p in parked)
            for i in range(len(item["message_ids"]))
        ]
        for start in range(0, len(outcomes), 500):
            self.finish(campaign_id, outcomes[start : start + 500], requeue=True)
        return len(outcomes)

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
            return MessageRecord(message_id=message_id, state=MessageState.QUEUED)
        return record

    def claim(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        *,
        lease_s: float,
        token: str,
    ) -> tuple[str, list[Claim]]:
        keys, argv = self._claim_args(campaign_id, items, lease_s, token)
        return self._parse_claims(items, self._claim(keys=keys, args=argv))

    def finish(
        self, campaign_id: str, outcomes: Iterable[Transition], *, requeue: bool = False
    ) -> str:
        keys, argv = self._finish_args(campaign_id, outcomes, requeue)
        return _text(self._finish(keys=keys, args=argv)[0])


class AsyncStatusStore(_Base):
    """The worker's view: the per-batch operations, on an asyncio Redis client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "sestasks",
        retention_s: int = 30 * 86400,
    ) -> None:
        super().__init__(key_prefix=key_prefix, retention_s=retention_s)
        self.redis = client
        self._claim = client.register_script(CLAIM_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._park = client.register_script(PARK_LUA)

    async def claim(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        *,
        lease_s: float,
        token: str,
    ) -> tuple[str, list[Claim]]:
        keys, argv = self._claim_args(campaign_id, items, lease_s, token)
        return self._parse_claims(items, await self._claim(keys=keys, args=argv))

    async def finish(
        self, campaign_id: str, outcomes: Iterable[Transition], *, requeue: bool = False
    ) -> str:
        keys, argv = self._finish_args(campaign_id, outcomes, requeue)
        return _text((await self._finish(keys=keys, args=argv))[0])

    async def park(
        self, campaign_id: str, payload: dict[str, Any], message_ids: Sequence[str], reason: str
    ) -> str:
        """Park a paused campaign's messages; returns the campaign state (``paused`` if parked)."""
        keys, argv = self._park_args(campaign_id, payload, message_ids, reason)
        return _text(await self._park(keys=keys, args=argv))

    async def campaign_fields(self, campaign_id: str, *names: str) -> list[str | None]:
        raw = await self.redis.hmget(self.keys.campaign(campaign_id), list(names))
        return [None if v is None else _text(v) for v in raw]

    async def set_campaign_fields(self, campaign_id: str, **fields: str) -> None:
        await self.redis.hset(self.keys.campaign(campaign_id), mapping=fields)  # type: ignore[arg-type]

    async def pause(self, campaign_id: str, reason: str, *, kind: str) -> None:
        """Pause by the system (endpoint failure): only a running campaign is paused."""
        key = self.keys.campaign(campaign_id)
        state = await self.redis.hget(key, "state")
        if state is not None and _text(state) in ("running", "enqueueing"):
            await self.redis.hset(
                key, mapping={"state": "paused", "reason": reason, "pause_kind": kind}
            )

    async def template(self, campaign_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.template(campaign_id))
        return json.loads(raw) if raw else None

    async def suppressed(self, emails: Sequence[str]) -> list[bool]:
        if not emails:
            return []
        raw = await self.redis.hmget(self.keys.suppression(), [e.lower() for e in emails])
        return [v is not None for v in raw]
