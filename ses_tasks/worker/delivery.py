"""What a worker does with a batch, on its event loop: the one delivery path.

claim (one script: idempotency, suppression, pause/cancel, the batch's ledger entry) ->
render -> per chunk: quota, fleet rate limit, send over the warm pool -> record outcomes
and settle the batch (one script: outcomes, hand-backs, follow-up batches, ledger). A
transactional message is a batch of one at transactional priority.

The rules that keep mail from being lost or doubled:
- every Redis call rides out a short outage in place (``persist``); a live worker never
  re-runs a batch to record it;
- sends already started are always awaited and their outcomes recorded, whatever else
  failed;
- a lease keeper renews the claim while the batch waits on the limiter and sends, and a
  chunk is not sent unless the lease is fresh, so no live worker's messages are taken over;
- claimed messages that were not sent are handed back in the same step that writes the
  follow-up batch holding them, so a message is always either final or in the ledger.

Nothing here talks to Celery: the task layer publishes the returned follow-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from redis.exceptions import RedisError

from ses_tasks.errors import SesTasksError, ValidationError
from ses_tasks.keys import TRANSACTIONAL
from ses_tasks.limits.quota import QuotaDecision, QuotaUnavailableError
from ses_tasks.limits.ratelimit import LimiterUnavailableError, Priority, YieldRequested
from ses_tasks.message.spec import CampaignTemplate, MessageSpec, RenderedMessage, render_message
from ses_tasks.ops import observe
from ses_tasks.ops.observe import observers
from ses_tasks.smtp.replies import SendResult
from ses_tasks.states import CampaignState, ClaimDecision, MessageState, Outcome
from ses_tasks.store.tracking import (
    Claim,
    ClaimReply,
    LedgerEntry,
    RenewReply,
    Settlement,
    Transition,
)

if TYPE_CHECKING:
    from ses_tasks.config import Settings

__all__ = [
    "BatchItem",
    "BatchJob",
    "BatchReport",
    "Decision",
    "DeliveryRuntime",
    "Policy",
    "RetryKind",
    "StoreUnavailableError",
    "decide",
    "deliver",
    "persist",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

TEMPLATE_CACHE_SIZE = 64
#: Outcomes after which SES may have counted the recipients against the 24-hour quota.
SPENT = frozenset({Outcome.SENT, Outcome.UNKNOWN})
STOP_STATES = frozenset({CampaignState.PAUSED, CampaignState.CANCELLED})
#: A paused transactional campaign: its messages are deferred and tried again this often.
TRANSACTIONAL_PAUSE_RETRY_S = 10.0
#: Messages handed back after a store outage are tried again after this long.
HAND_BACK_DELAY_S = 1.0
#: Errors of Redis (directly, or through the limiter and quota) that a retry may cure.
STORE_ERRORS = (RedisError, LimiterUnavailableError, QuotaUnavailableError)


class StoreUnavailableError(SesTasksError, ConnectionError):
    """Redis did not answer for longer than the call's budget."""


# The batch, at the broker edge ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One message of a batch. On the wire: ``[seq, email, variables, attempts(, spec)]``."""

    seq: int | str
    email: str
    variables: dict[str, Any] = field(default_factory=dict)
    #: Tries that ended transient or unknown: they spend the ``max_attempts`` budget.
    attempts: int = 0
    #: A whole transactional message (``MessageSpec`` as JSON); None for campaign rows.
    spec: dict[str, Any] | None = None

    def to_json(self) -> list[Any]:
        row: list[Any] = [self.seq, self.email, self.variables, self.attempts]
        return row if self.spec is None else [*row, self.spec]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> BatchItem:
        if not isinstance(raw, list | tuple) or len(raw) not in (4, 5):
            raise ValueError(f"a batch item is [seq, email, variables, attempts], not {raw!r}")
        spec = raw[4] if len(raw) == 5 else None
        return cls(raw[0], str(raw[1]), dict(raw[2] or {}), int(raw[3]), spec)


@dataclass(frozen=True, slots=True)
class BatchJob:
    campaign_id: str
    items: tuple[BatchItem, ...]
    #: The batch's ledger entry ('' for a task published before the ledger existed).
    batch_id: str = ""
    priority: Priority = Priority.BULK
    #: The sender profile that sends it ('' is the unnamed default).
    profile: str = ""

    @property
    def single(self) -> bool:
        """A single message (``send_email``), whichever lane it takes (``priority``): it
        keeps no row, reports its record, reuses its message id for its follow-ups, is
        deferred (not parked) while the standing campaign is paused, and a sender refusal
        or a fatal endpoint error fails or defers it instead of pausing the campaign."""
        return self.campaign_id == TRANSACTIONAL

    def message_id(self, item: BatchItem) -> str:
        return f"{self.campaign_id}.{item.seq}"

    def payload(self, items: Sequence[BatchItem] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items": [i.to_json() for i in (self.items if items is None else items)],
            "priority": self.priority.value,
        }
        if self.profile:
            out["profile"] = self.profile
        return out

    @classmethod
    def from_payload(cls, campaign_id: str, batch_id: str, payload: dict[str, Any]) -> BatchJob:
        return cls(
            campaign_id,
            tuple(BatchItem.from_json(i) for i in payload["items"]),
            batch_id,
            Priority(payload.get("priority", Priority.BULK.value)),
            str(payload.get("profile") or ""),
        )


# The decision: pure ----------------------------------------------------------------------


class RetryKind(StrEnum):
    NONE = "none"
    #: 454 throttling: the fleet slows down; retried soon, attempts not spent.
    THROTTLE = "throttle"
    #: Transient failure (or an unknown outcome with resend on): capped exponential backoff.
    BACKOFF = "backoff"
    #: The 24-hour quota: retried when the window frees up, attempts not spent.
    QUOTA = "quota"
    #: The endpoint refused us (credentials, account paused, TLS): the campaign pauses.
    ENDPOINT = "endpoint"


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int = 5
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    throttle_retry_s: float = 1.0
    resend_unknown: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(
            s.max_attempts, s.retry_base_s, s.retry_max_s, s.throttle_retry_s, s.resend_unknown
        )

    def backoff_s(self, attempts: int, rng: random.Random | None = None) -> float:
        """Capped exponential backoff with +-25% jitter, so retries of a batch spread out."""
        jitter = (rng or random).uniform(0.75, 1.25)
        return min(self.retry_max_s, self.retry_base_s * 2 ** max(0, attempts - 1)) * jitter

    def throttle_s(self, rng: random.Random | None = None) -> float:
        return self.throttle_retry_s * (rng or random).uniform(0.5, 1.5)


@dataclass(frozen=True, slots=True)
class Decision:
    state: MessageState
    retry: RetryKind
    #: The item's attempt count after this outcome.
    attempts: int
    #: Final and not sent: keep the recipient row so retry-failed can requeue it.
    keep_row: bool = False
    #: Prefix for the recorded reason.
    note: str = ""


def decide(outcome: Outcome, attempts: int, policy: Policy) -> Decision:
    """What one send's outcome means for the message. The only copy of this policy."""
    spent = attempts + 1
    match outcome:
        case Outcome.SENT:
            return Decision(MessageState.SENT, RetryKind.NONE, attempts)
        case Outcome.THROTTLED:
            return Decision(MessageState.RETRYING, RetryKind.THROTTLE, attempts)
        case Outcome.QUOTA_EXHAUSTED:
            return Decision(MessageState.DEFERRED, RetryKind.QUOTA, attempts)
        case Outcome.FATAL:
            return Decision(MessageState.DEFERRED, RetryKind.ENDPOINT, attempts)
        case Outcome.PERMANENT:
            return Decision(MessageState.FAILED, RetryKind.NONE, attempts, keep_row=True)
        case Outcome.TRANSIENT if spent < policy.max_attempts:
            return Decision(MessageState.RETRYING, RetryKind.BACKOFF, spent)
        case Outcome.TRANSIENT:
            note = f"gave up after {spent} attempts: "
            return Decision(MessageState.FAILED, RetryKind.NONE, spent, True, note)
        case Outcome.UNKNOWN if policy.resend_unknown and spent < policy.max_attempts:
            note = "outcome unknown, resending: "
            return Decision(MessageState.RETRYING, RetryKind.BACKOFF, spent, note=note)
        case _:
            return Decision(MessageState.UNKNOWN, RetryKind.NONE, spent, keep_row=True)


# What delivery needs from its process (fakes in unit tests) ------------------------------


class StoreOps(Protocol):
    async def claim(
        self,
        campaign_id: str,
        items: Sequence[tuple[str, str, bool]],
        *,
        lease_s: float,
        token: str,
        batch_id: str = "",
    ) -> ClaimReply: ...

    async def finish(
        self,
        campaign_id: str,
        outcomes: Sequence[Transition],
        *,
        requeue: bool = False,
        settle: Settlement = ...,
    ) -> CampaignState | None: ...

    async def park(
        self,
        campaign_id: str,
        payload: dict[str, Any],
        message_ids: Sequence[str],
        reason: str,
        token: str,
    ) -> CampaignState | None: ...

    async def renew(
        self,
        campaign_id: str,
        message_ids: Sequence[str],
        *,
        lease_s: float,
        token: str,
        batch_id: str = "",
    ) -> RenewReply: ...

    async def pause(self, campaign_id: str, reason: str, *, kind: str) -> None: ...
    async def set_campaign_fields(self, campaign_id: str, **fields: str) -> None: ...
    async def template(self, campaign_id: str) -> dict[str, Any] | None: ...
    async def suppressed(self, emails: Sequence[str]) -> list[bool]: ...


class LimiterOps(Protocol):
    async def acquire(self, n: int, *, priority: Priority = ..., campaign: str = ...) -> float: ...
    async def on_throttle(self) -> float: ...


class QuotaOps(Protocol):
    async def try_consume(self, n: int) -> QuotaDecision: ...
    async def release(self, n: int) -> int: ...
    async def mark_exhausted(self) -> float: ...


class PoolOps(Protocol):
    async def send(
        self, envelope_from: str, recipients: Sequence[str], data: bytes
    ) -> SendResult: ...


class DeliveryRuntime(Protocol):
    """What delivery needs from its process (read-only, so any subtype fits)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def token(self) -> str:
        """Identifies this process; each batch run adds a nonce of its own."""
        ...

    @property
    def store(self) -> StoreOps: ...

    @property
    def limiter(self) -> LimiterOps: ...

    @property
    def quota(self) -> QuotaOps: ...

    @property
    def pool(self) -> PoolOps: ...

    @property
    def templates(self) -> dict[str, Any]: ...


# Riding out a store outage ---------------------------------------------------------------


async def persist(
    what: str, call: Callable[[], Awaitable[T]], *, budget_s: float, first_delay_s: float = 0.05
) -> T:
    """Run a Redis call, retrying through an outage of up to ``budget_s``.

    Every Redis error class is retried (connection, timeout, READONLY, OOM, NOPERM,
    LOADING, BUSY, a script error): each may clear up in seconds, and each of our scripts
    is atomic and safe to run again.
    """
    deadline = time.monotonic() + budget_s
    delay = first_delay_s
    failures = 0
    while True:
        try:
            return await call()
        except STORE_ERRORS as exc:
            failures += 1
            if time.monotonic() + delay > deadline:
                raise StoreUnavailableError(f"{what}: Redis unavailable ({exc})") from exc
            if failures == 1 or failures % 10 == 0:
                log.warning("%s: Redis error (%s); retrying (%d)", what, exc, failures)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


# The run of one batch --------------------------------------------------------------------


@dataclass(slots=True)
class FollowUp:
    """A new batch to publish after ``countdown_s``; already in the ledger."""

    job: BatchJob
    countdown_s: float
    why: str
    #: Back in the campaign's backlog: the dispatcher hands it out, nobody publishes it.
    stored: bool = False


@dataclass(slots=True)
class BatchReport:
    sent: int = 0
    recorded: int = 0
    follow_ups: list[FollowUp] = field(default_factory=list)
    stopped: str | None = None
    #: Outcomes that could not be recorded (Redis down past the budget): their messages
    #: stay ``sending`` until the lease runs out, then are swept and resent ``recovered``.
    unrecorded: int = 0
    #: For a batch of one: the message's record as the caller should see it.
    record: dict[str, Any] | None = None


@dataclass(slots=True)
class _Ready:
    item: BatchItem
    message_id: str
    rendered: RenderedMessage
    recipients: list[str]


async def campaign_template(rt: DeliveryRuntime, campaign_id: str) -> CampaignTemplate | None:
    cached = rt.templates.get(campaign_id)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    data = await rt.store.template(campaign_id)
    if data is None:
        return None
    template = CampaignTemplate.from_dict(data)
    if len(rt.templates) >= TEMPLATE_CACHE_SIZE:
        rt.templates.pop(next(iter(rt.templates)))
    rt.templates[campaign_id] = template
    return template


def _first_recipient(spec: dict[str, Any]) -> str:
    for name in ("to", "cc", "bcc"):
        value = spec.get(name)
        if isinstance(value, list) and value:
            return str(value[0])
    return ""


class _Run:
    """One batch's bookkeeping, from claim to settlement."""

    def __init__(self, rt: DeliveryRuntime, job: BatchJob) -> None:
        s = rt.settings
        self.rt = rt
        self.job = job
        self.policy = Policy.from_settings(s)
        self.token = f"{rt.token}:{secrets.token_hex(4)}"
        self.lease_s = s.claim_lease_s
        self.hot_budget_s = s.store_retry_s
        self.record_budget_s = max(s.store_retry_s, s.claim_lease_s)
        self.report = BatchReport()
        self.campaign_state: CampaignState | None = CampaignState.RUNNING
        self.pending: list[Transition] = []
        #: Messages whose outcome this run has (pending or written): never "taken over".
        self.outcome_known: set[str] = set()
        #: Claimed by us and not yet recorded final or handed back: the lease keeper's list.
        self.held: dict[str, BatchItem] = {}
        #: Taken over by another worker (lease lost): never send these.
        self.lost: set[str] = set()
        self.lease_fresh_until = time.monotonic() + self.lease_s
        self.follow_items: dict[tuple[RetryKind, int], list[BatchItem]] = defaultdict(list)
        self.busy: list[tuple[BatchItem, float]] = []
        self.to_park: list[BatchItem] = []
        self.unsent: list[BatchItem] = []
        self.fatal_reason = ""
        #: SES refused the sender identity of a campaign message: this campaign pauses.
        self.identity_reason = ""
        self.fatal_items: list[BatchItem] = []
        self.quota_retry_s: float | None = None
        self.store_down = False
        self.yielded = False
        self.throttled = False

    # Claim and render -------------------------------------------------------------------

    def mid(self, item: BatchItem) -> str:
        return self.job.message_id(item)

    async def claim(self) -> list[_Ready]:
        job, rt = self.job, self.rt
        rendered: dict[str, RenderedMessage | str] = {
            self.mid(item): self._render_spec(item.spec)
            for item in job.items
            if item.spec is not None
        }

        def recipients(item: BatchItem) -> list[str]:
            r = rendered.get(self.mid(item))
            return r.recipients if isinstance(r, RenderedMessage) else [item.email]

        all_rcpts = [x for item in job.items for x in recipients(item)]
        flags = await persist(
            "suppression check",
            lambda: rt.store.suppressed(all_rcpts),
            budget_s=self.hot_budget_s,
        )
        suppressed_of: dict[str, bool] = dict(zip(all_rcpts, flags, strict=True))
        entries = [
            (self.mid(item), item.email, all(suppressed_of[x] for x in recipients(item)))
            for item in job.items
        ]
        if any(item.spec is None for item in job.items):  # before claiming: a claim
            # abandoned for a missing template would look like a dead worker's
            await persist(
                "template",
                lambda: campaign_template(rt, job.campaign_id),
                budget_s=self.hot_budget_s,
            )
        reply = await persist(
            "claim",
            lambda: rt.store.claim(
                job.campaign_id,
                entries,
                lease_s=self.lease_s,
                token=self.token,
                batch_id=job.batch_id,
            ),
            budget_s=self.hot_budget_s,
        )
        self.campaign_state = reply.campaign_state
        observe.claims_recorded(job, reply.claims)
        self.lease_fresh_until = time.monotonic() + self.lease_s
        return await self._sort_claims(reply.claims, rendered, suppressed_of)

    def _render_spec(self, spec: dict[str, Any]) -> RenderedMessage | str:
        try:
            return render_message(
                MessageSpec.model_validate(spec), max_bytes=self.rt.settings.max_message_bytes
            )
        except ValidationError as exc:
            return str(exc)
        except Exception as exc:  # pydantic errors from a hand-made spec
            return f"invalid message: {exc}"

    async def _sort_claims(
        self,
        claims: Sequence[Claim],
        rendered: dict[str, RenderedMessage | str],
        suppressed_of: dict[str, bool],
    ) -> list[_Ready]:
        ready: list[_Ready] = []
        template: CampaignTemplate | None = None
        pairs = zip(claims, self.job.items, strict=True)
        if any(c.go and i.spec is None for c, i in pairs):
            template = await persist(
                "template",
                lambda: campaign_template(self.rt, self.job.campaign_id),
                budget_s=self.hot_budget_s,
            )
        for item, claim in zip(self.job.items, claims, strict=True):
            mid = claim.message_id
            match claim.decision:
                case ClaimDecision.BUSY:
                    self.busy.append((item, claim.retry_after_s))
                case ClaimDecision.PAUSED:
                    self.to_park.append(item)
                case ClaimDecision.GO | ClaimDecision.RECOVERED:
                    self.held[mid] = item
                    if claim.recovered:
                        log.warning("message %s: resending after its worker was lost", mid)
                    r = rendered.get(mid) if item.spec is not None else None
                    if item.spec is None:
                        r = self._render_row(template, item, mid)
                    if isinstance(r, RenderedMessage):
                        rcpts = [x for x in r.recipients if not suppressed_of.get(x, False)]
                        ready.append(_Ready(item, mid, r, rcpts))
                    else:
                        self._record(item, MessageState.FAILED, 0, str(r), keep_row=True)
                case _:
                    pass  # final already, or recorded by the claim itself
        return ready

    def _render_row(
        self, template: CampaignTemplate | None, item: BatchItem, mid: str
    ) -> RenderedMessage | str:
        try:
            if template is None:
                raise ValidationError("campaign", "template missing (expired or deleted)")
            return template.render(item.email, item.variables, message_id=mid)
        except ValidationError as exc:
            return str(exc)

    # Recording --------------------------------------------------------------------------

    def _record(
        self,
        item: BatchItem,
        state: MessageState,
        code: int,
        reason: str,
        ses_message_id: str | None = None,
        *,
        keep_row: bool = False,
    ) -> None:
        mid = self.mid(item)
        row = None
        # A campaign's row (recipient and variables) lets retry-failed requeue it; a
        # transactional message's row would be its whole body, which is never kept.
        if keep_row and not self.job.single:
            row = item.to_json()
        # Still held (and renewed) until the record is written.
        self.pending.append(Transition(mid, state, code, reason, ses_message_id, row=row))
        self.outcome_known.add(mid)
        if self.job.single:
            self.report.record = {
                "message_id": mid,
                "state": state.value,
                "ses_message_id": ses_message_id,
                "code": code,
                "reason": reason,
            }

    async def flush(self, *, budget_s: float) -> None:
        """Write pending outcomes (mid-batch: keeps them pending if Redis is down)."""
        if not self.pending:
            return
        batch = self.pending
        state = await persist(
            "record outcomes",
            lambda: self.rt.store.finish(self.job.campaign_id, batch, settle=self._token_only()),
            budget_s=budget_s,
        )
        self.pending = self.pending[len(batch) :]
        for t in batch:
            self.held.pop(t.message_id, None)
        self._observe_recorded(batch)
        observe.transitions_recorded(self.job, batch)
        self.campaign_state = state
        self.report.recorded += len(batch)

    def _token_only(self) -> Settlement:
        return Settlement(token=self.token)

    @staticmethod
    def _observe_recorded(batch: Sequence[Transition]) -> None:
        if observers:
            for state, count in Counter(t.state.value for t in batch).items():
                for observer in observers:
                    observer.message_recorded(state, count)

    # Lease keeping ----------------------------------------------------------------------

    async def keep_lease(self) -> None:
        interval = max(0.05, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            await self.renew_once()

    async def renew_once(self) -> bool:
        ids = list(self.held)
        if not ids:
            return True
        started = time.monotonic()
        try:
            reply = await self.rt.store.renew(
                self.job.campaign_id,
                ids,
                lease_s=self.lease_s,
                token=self.token,
                batch_id=self.job.batch_id,
            )
        except STORE_ERRORS as exc:
            log.warning("lease renewal failed (%s); will stop sending if it stays down", exc)
            return False
        self.lease_fresh_until = started + self.lease_s
        self.campaign_state = reply.campaign_state
        for mid in reply.lost:
            if mid in self.outcome_known:
                continue  # settled by our own record (the flush ran first)
            log.error("message %s was taken over by another worker; not sending it", mid)
            self.lost.add(mid)
        return True

    async def lease_ok(self, needed_s: float) -> bool:
        """True if our claim will outlast ``needed_s`` more seconds of sending."""
        margin = needed_s
        if self.lease_fresh_until - time.monotonic() > margin:
            return True
        return await self.renew_once() and self.lease_fresh_until - time.monotonic() > margin

    # Sending ----------------------------------------------------------------------------

    async def send_all(self, ready: list[_Ready]) -> None:
        rt, s = self.rt, self.rt.settings
        chunk_size = max(1, min(s.pool_size, int(s.burst)))
        inflight: set[asyncio.Task[tuple[_Ready, SendResult]]] = set()
        priority = self.job.priority

        async def send_one(r: _Ready) -> tuple[_Ready, SendResult]:
            m = r.rendered
            started = time.perf_counter()
            try:
                result = await rt.pool.send(m.envelope_from, r.recipients, m.data)
            except Exception as exc:
                # The pool reports outcomes, it does not raise (a closed pool at shutdown,
                # a bug): we cannot tell whether the data went out, so it is "unknown",
                # recorded like any other outcome, never dropped with its batch.
                log.exception("message %s: the send raised", r.message_id)
                result = SendResult(Outcome.UNKNOWN, 0, f"send failed: {type(exc).__name__}")
            for observer in observers:
                observer.send_latency(time.perf_counter() - started)
            return r, result

        started = 0
        try:
            while started < len(ready):
                if self._must_stop():
                    break
                chunk = [r for r in ready[started : started + chunk_size]]
                chunk_live = [r for r in chunk if r.message_id not in self.lost]
                weight = sum(len(r.recipients) for r in chunk_live)
                if weight and not await self._take_tokens(weight, priority):
                    break
                if not await self.lease_ok(min(s.send_timeout, self.lease_s / 2)):
                    log.warning("claim could not be renewed; handing the rest of the batch back")
                    self.store_down = True
                    if weight:
                        await self._give_back_quota(weight)
                    break
                for r in chunk:
                    if r.message_id in self.lost:
                        continue
                    if not r.recipients:  # every recipient suppressed meanwhile
                        self._record(r.item, MessageState.SUPPRESSED, 0, "suppressed")
                        continue
                    inflight.add(asyncio.create_task(send_one(r)))
                started += len(chunk)
                if len(inflight) >= 2 * chunk_size:
                    done, inflight = await asyncio.wait(
                        inflight, return_when=asyncio.FIRST_COMPLETED
                    )
                    await self._collect(done)
                    if len(self.pending) >= chunk_size:
                        await self._flush_mid_batch()
        finally:
            # Whatever happened, sends already started finish and are recorded.
            if inflight:
                done, _ = await asyncio.wait(inflight)
                await self._collect(done)
            self.unsent = [r.item for r in ready[started:] if r.message_id not in self.lost]

    def _must_stop(self) -> bool:
        if self.campaign_state in STOP_STATES and not self.job.single:
            return True
        if self.campaign_state is CampaignState.PAUSED:
            return True  # a paused transactional campaign defers its messages
        return (
            bool(self.fatal_reason)
            or bool(self.identity_reason)
            or self.quota_retry_s is not None
            or self.store_down
            or self.yielded
            # The process is shutting down: hand the rest back instead of starting sends.
            or bool(getattr(self.rt, "stopping", False))
        )

    async def _take_tokens(self, weight: int, priority: Priority) -> bool:
        rt, s = self.rt, self.rt.settings
        # Bulk names its campaign: the limiter holds each campaign to its fair share.
        campaign = self.job.campaign_id if not self.job.single and priority is Priority.BULK else ""
        try:
            decision = await persist(
                "quota", lambda: rt.quota.try_consume(weight), budget_s=self.hot_budget_s
            )
            if not decision.granted:
                self.quota_retry_s = min(max(decision.retry_after_s, 1.0), s.retry_max_s)
                return False
            waited_s = await persist(
                "rate limit",
                lambda: rt.limiter.acquire(weight, priority=priority, campaign=campaign),
                budget_s=self.hot_budget_s,
            )
        except StoreUnavailableError as exc:
            log.warning("%s; handing the rest of the batch back", exc)
            self.store_down = True
            return False
        except YieldRequested:
            # A new campaign needs a worker: hand the rest back to a follow-up batch.
            log.info("batch of %s makes room for a new campaign", self.job.campaign_id)
            await self._give_back_quota(weight)
            self.yielded = True
            self.report.stopped = "yield"
            return False
        for observer in observers:
            observer.limiter_wait(waited_s, priority=priority.value)
        return True

    async def _give_back_quota(self, n: int) -> None:
        try:
            await persist("quota release", lambda: self.rt.quota.release(n), budget_s=5.0)
        except StoreUnavailableError:
            log.warning("could not give back %d quota units; the window over-counts them", n)

    async def _flush_mid_batch(self) -> None:
        # On failure they stay pending: the final settle writes them with a long budget.
        with contextlib.suppress(StoreUnavailableError):
            await self.flush(budget_s=1.0)

    async def _collect(self, done: set[asyncio.Task[tuple[_Ready, SendResult]]]) -> None:
        unused = 0
        for task in done:
            r, result = task.result()
            await self._classify(r, result)
            if result.outcome not in SPENT:
                unused += len(r.recipients)
        if unused:
            await self._give_back_quota(unused)  # SES did not take them

    async def _classify(self, r: _Ready, result: SendResult) -> None:
        item, outcome = r.item, result.outcome
        for observer in observers:
            observer.message_outcome(outcome.value, priority=self.job.priority.value)
        d = decide(outcome, item.attempts, self.policy)
        reason = d.note + result.reason
        if outcome is Outcome.SENT:
            self.report.sent += 1
        elif outcome is Outcome.THROTTLED and not self.throttled:
            self.throttled = True
            await self._best_effort("throttle", self.rt.limiter.on_throttle)
        elif outcome is Outcome.QUOTA_EXHAUSTED:
            retry_s = await self._best_effort("quota exhausted", self.rt.quota.mark_exhausted)
            s = self.rt.settings
            self.quota_retry_s = min(max(retry_s or s.retry_max_s, 1.0), s.retry_max_s)
        elif outcome is Outcome.FATAL:
            self.fatal_reason = f"{result.code} {result.reason}" if result.code else result.reason
            self.fatal_items.append(item)  # held back with the rest of the batch
            return
        elif result.identity is not None:
            # One sender identity refused (IAM, not verified): not the endpoint's fault, so
            # only what is sent from it stops. Transactional mail fails (PERMANENT: final,
            # not retried); a campaign is paused and this message held back with the rest.
            reason = f"sender identity {result.identity} refused: {result.code} {result.reason}"
            if not self.job.single:
                self.identity_reason = self.identity_reason or reason
                self.fatal_items.append(item)
                return
            if _is_iam_denial(result.reason):
                # SES names the sender's identity in an IAM denial even when the policy
                # denies every identity (detached policy, an SCP): retry later, as for an
                # endpoint refusal, rather than fail password resets for good.
                self._record(item, MessageState.DEFERRED, result.code, reason)
                self.follow_items[(RetryKind.ENDPOINT, 0)].append(item)
                return
        self._record(item, d.state, result.code, reason, result.ses_message_id, keep_row=d.keep_row)
        if d.retry is not RetryKind.NONE:
            delay_key = 0 if d.retry is not RetryKind.BACKOFF else d.attempts
            self.follow_items[(d.retry, delay_key)].append(replace(item, attempts=d.attempts))

    async def _best_effort(self, what: str, call: Callable[[], Awaitable[float]]) -> float | None:
        try:
            return await persist(what, call, budget_s=5.0)
        except StoreUnavailableError as exc:
            log.warning("%s", exc)
            return None

    # Settling ---------------------------------------------------------------------------

    def _follow_up(
        self, items: list[BatchItem], delay_s: float, why: str, *, stored: bool = False
    ) -> LedgerEntry:
        job = self.job
        if job.single:
            batch_id = self.mid(items[0])  # a single message's entry is its message id
            stored = False
        else:
            batch_id = f"f{items[0].seq}-{secrets.token_hex(4)}"
        follow = replace(job, items=tuple(items), batch_id=batch_id)
        self.report.follow_ups.append(FollowUp(follow, delay_s, why, stored))
        for observer in observers:
            observer.retry_scheduled(why, len(items))
        return LedgerEntry(batch_id, follow.payload(), delay_s, stored)

    async def settle(self, *, done: bool = True) -> None:
        job, policy, s = self.job, self.policy, self.rt.settings
        transactional = job.single
        release: list[str] = []
        entries: list[LedgerEntry] = []
        self.unsent = self.fatal_items + self.unsent
        if self.fatal_reason:
            reason = f"endpoint refused: {self.fatal_reason}"
            if transactional:
                for item in self.unsent:
                    self._record(item, MessageState.DEFERRED, 0, reason)
                entries.append(self._follow_up(self.unsent, s.retry_max_s, "endpoint refused"))
                self.unsent = []
            else:
                await self._best_effort_pause(reason)
                self.campaign_state = CampaignState.PAUSED
            self.report.stopped = "fatal"
        elif self.identity_reason:  # this campaign only: the pool and the others go on
            await self._best_effort_pause(self.identity_reason, kind="identity")
            self.campaign_state = CampaignState.PAUSED
            self.report.stopped = "identity"
        if self.unsent:
            await self._hold_back(self.unsent, release, entries)
        if self.to_park:
            await self._park_or_hand_back(self.to_park, release, entries, claimed=False)
        for (kind, attempts), items in self.follow_items.items():
            match kind:
                case RetryKind.THROTTLE:
                    delay, why = policy.throttle_s(), "throttled"
                case RetryKind.QUOTA:
                    delay, why = self.quota_retry_s or s.retry_max_s, "24-hour quota used up"
                case RetryKind.ENDPOINT:
                    delay, why = s.retry_max_s, "sender not authorized (IAM)"
                case _:
                    delay, why = policy.backoff_s(attempts), f"transient failure #{attempts}"
            entries.append(self._follow_up(items, delay, why))
        if self.busy and not job.batch_id:  # with an entry, the entry itself covers them
            wait_s = max(after for _, after in self.busy) + 1.0
            entries.append(
                self._follow_up([i for i, _ in self.busy], wait_s, "held by another worker")
            )
        lost_items = [i for i in job.items if self.mid(i) in self.lost]
        if lost_items:  # covered again in case the worker that took them over dies too
            entries.append(self._follow_up(lost_items, self.lease_s, "taken over"))
        settle = Settlement(
            token=self.token,
            release=release,
            # A copy that found messages held by another run leaves the entry to that run
            # (removing it would free a live batch's entry and its dispatch credit). If
            # that run dies, the entry comes due after its lease and is swept.
            done_batch=job.batch_id if done and not self.busy else "",
            follow_ups=entries,
        )
        batch = self.pending
        # Retry while our claim surely holds (the keeper renews it meanwhile); past that
        # another worker may take the batch over, and recording late could not stop it.
        budget_s = max(1.0, min(self.record_budget_s, self.lease_fresh_until - time.monotonic()))
        try:
            state = await persist(
                "record outcomes",
                lambda: self.rt.store.finish(job.campaign_id, batch, settle=settle),
                budget_s=budget_s,
            )
        except StoreUnavailableError as exc:
            self.report.unrecorded = len(batch)
            self.report.follow_ups = []  # not in the ledger: the sweeper recovers the batch
            log.error(
                "%s: %d outcomes of campaign %s not recorded (%s); their messages will be "
                "swept after the lease and resent as recovered",
                exc,
                len(batch),
                job.campaign_id,
                ", ".join(f"{t.message_id}={t.state.value}" for t in batch[:20]),
            )
            return
        self.pending = []
        self.held.clear()
        self._observe_recorded(batch)
        observe.transitions_recorded(self.job, batch)
        self.report.recorded += len(batch)
        self.campaign_state = state
        if state is CampaignState.COMPLETED and not job.single:
            await self._drop_template()

    async def _drop_template(self) -> None:
        """Privacy: the campaign's bodies go once nothing can be sent with them (best
        effort: left behind, they expire with the campaign at RETENTION_S)."""
        drop = getattr(self.rt.store, "drop_template_if_done", None)
        if drop is None:
            return
        try:
            await persist("drop template", lambda: drop(self.job.campaign_id), budget_s=2.0)
        except StoreUnavailableError as exc:
            log.warning("campaign %s: template not dropped (%s)", self.job.campaign_id, exc)

    async def _best_effort_pause(self, reason: str, *, kind: str = "endpoint") -> None:
        try:
            await persist(
                "pause campaign",
                lambda: self.rt.store.pause(self.job.campaign_id, reason, kind=kind),
                budget_s=self.hot_budget_s,
            )
            log.error("campaign %s paused: %s", self.job.campaign_id, reason)
        except StoreUnavailableError as exc:
            log.error("campaign %s not paused (%s): %s", self.job.campaign_id, exc, reason)

    async def _hold_back(
        self, items: list[BatchItem], release: list[str], entries: list[LedgerEntry]
    ) -> None:
        """Messages claimed but not sent: park, cancel, defer or hand back; never drop."""
        state = self.campaign_state
        if state is CampaignState.CANCELLED and not self.job.single:
            for item in items:
                self._record(item, MessageState.CANCELLED, 0, "campaign cancelled")
            return
        if state is CampaignState.PAUSED:
            await self._park_or_hand_back(items, release, entries, claimed=True)
            return
        if self.quota_retry_s is not None:
            reason = f"24-hour sending quota used up; retrying in {self.quota_retry_s:.0f} s"
            for item in items:
                self._record(item, MessageState.DEFERRED, 0, reason)
            await self._best_effort(
                "note quota",
                lambda: self._set_deferred_reason(reason),
            )
            entries.append(self._follow_up(items, self.quota_retry_s, "24-hour quota used up"))
            return
        release.extend(self.mid(i) for i in items)
        # Made room for a new campaign, or the process stops: the rest goes back to the
        # backlog, so the dispatcher hands it out again within its window.
        stored = self.yielded or bool(getattr(self.rt, "stopping", False))
        entries.append(self._follow_up(items, HAND_BACK_DELAY_S, "handed back", stored=stored))

    async def _set_deferred_reason(self, reason: str) -> float:
        await self.rt.store.set_campaign_fields(self.job.campaign_id, deferred_reason=reason)
        return 0.0

    async def _park_or_hand_back(
        self,
        items: list[BatchItem],
        release: list[str],
        entries: list[LedgerEntry],
        *,
        claimed: bool,
    ) -> None:
        job = self.job
        if job.single:
            reason = "transactional mail paused; retrying"
            for item in items:
                self._record(item, MessageState.DEFERRED, 0, reason)
            entries.append(self._follow_up(items, TRANSACTIONAL_PAUSE_RETRY_S, "paused"))
            return
        ids = [self.mid(i) for i in items]
        payload = {**job.payload(items), "message_ids": ids}
        try:
            state = await persist(
                "park",
                lambda: self.rt.store.park(
                    job.campaign_id, payload, ids, "campaign paused", self.token
                ),
                budget_s=self.hot_budget_s,
            )
        except StoreUnavailableError:
            state = None
        if state is CampaignState.PAUSED:
            for mid in ids:
                self.held.pop(mid, None)
            return
        # Resumed meanwhile (or the store is down): hand them back to a follow-up.
        if claimed:
            release.extend(ids)
        entries.append(self._follow_up(items, 0.0, "campaign resumed"))


def _is_iam_denial(reason: str) -> bool:
    low = reason.lower()
    return "not authorized to perform" in low or "access denied" in low


async def deliver(rt: DeliveryRuntime, job: BatchJob) -> BatchReport:
    """Send one batch; every claimed message ends recorded, parked or in a follow-up.

    Raises ``StoreUnavailableError`` only before anything was sent (the claim could not be
    made): the caller retries the task.
    """
    job = _without_repeats(job)
    run = _Run(rt, job)
    if not job.items:
        return run.report
    ready = await run.claim()
    if run.campaign_state is None and job.campaign_id != TRANSACTIONAL:
        log.warning(
            "campaign %s has no record in the status store (Redis lost its data, or it "
            "expired): %d messages not sent",
            job.campaign_id,
            len(job.items),
        )
        run.report.stopped = "missing"
        return run.report
    if run.busy:
        log.info(
            "batch %s of %s: %d messages held by another run, which settles them",
            job.batch_id or "-",
            job.campaign_id,
            len(run.busy),
        )
    keeper = asyncio.create_task(run.keep_lease()) if run.held else None
    completed = False
    try:
        await run.send_all(ready)
        completed = True
    finally:
        try:
            # Settled only if every send was accounted for; otherwise the ledger entry
            # stays, and the sweeper takes the batch over once the lease has run out.
            await run.settle(done=completed)
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
    return run.report


def _without_repeats(job: BatchJob) -> BatchJob:
    """One item per message: a batch naming a message twice would send it twice."""
    seen: set[str] = set()
    items = []
    for item in job.items:
        mid = job.message_id(item)
        if mid not in seen:
            seen.add(mid)
            items.append(item)
    return job if len(items) == len(job.items) else replace(job, items=tuple(items))
