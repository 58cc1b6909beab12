"""What a worker does with a batch or a single message, on its event loop.

claim (one script: idempotency, suppression, pause/cancel) -> render -> quota -> fleet rate
limit -> send over the warm pool -> record outcomes (one script per flush). Nothing here
talks to Celery: the task layer turns the returned follow-ups into new tasks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ValidationError
from .keys import TRANSACTIONAL
from .message import CampaignTemplate, MessageSpec, RenderedMessage, render_message
from .observe import observers
from .ratelimit import Priority
from .smtp.replies import SendResult
from .states import CampaignState, MessageState, Outcome
from .tracking import Transition, parse_message

if TYPE_CHECKING:
    from .workers.runtime import WorkerRuntime

__all__ = ["BatchReport", "FollowUp", "MessageDecision", "process_batch", "process_message"]

log = logging.getLogger(__name__)

#: A batch item: [seq, email, variables, transient failures so far].
Item = list[Any]
STOP_STATES = frozenset({CampaignState.PAUSED.value, CampaignState.CANCELLED.value})
TEMPLATE_CACHE_SIZE = 64
#: Outcomes after which SES may have counted the recipients against the 24-hour quota.
SPENT = frozenset({Outcome.SENT, Outcome.UNKNOWN})


@dataclass(slots=True)
class FollowUp:
    """Items to enqueue again as a new batch after ``countdown_s``."""

    items: list[Item]
    countdown_s: float
    why: str


@dataclass(slots=True)
class BatchReport:
    sent: int = 0
    recorded: int = 0
    follow_ups: list[FollowUp] = field(default_factory=list)
    stopped: str | None = None


@dataclass(slots=True)
class MessageDecision:
    """A single message's result; ``retry_in_s`` set means: run the task again then."""

    record: dict[str, Any]
    retry_in_s: float | None = None
    failures: int = 0


def backoff_s(failures: int, *, base_s: float, max_s: float) -> float:
    """Capped exponential backoff with +-25% jitter, so retries of a batch spread out."""
    return min(max_s, base_s * 2 ** max(0, failures - 1)) * random.uniform(0.75, 1.25)


def throttle_delay_s(base_s: float) -> float:
    return base_s * random.uniform(0.5, 1.5)


def lease_for(rt: WorkerRuntime, count: int) -> float:
    """How long a claim holds messages: long enough to wait for tokens and send them all."""
    s = rt.settings
    return s.claim_lease_s + 3.0 * count / s.max_send_rate


async def campaign_template(rt: WorkerRuntime, campaign_id: str) -> CampaignTemplate | None:
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


@dataclass(slots=True)
class _Ready:
    item: Item
    message_id: str
    rendered: RenderedMessage


class _Batch:
    """One batch's bookkeeping: outcomes to record, follow-ups, why it stopped."""

    def __init__(self, rt: WorkerRuntime, campaign_id: str) -> None:
        self.rt = rt
        self.campaign_id = campaign_id
        self.report = BatchReport()
        self.pending: list[Transition] = []
        self.transient: dict[int, list[Item]] = defaultdict(list)
        self.throttled: list[Item] = []
        self.fatal: list[Item] = []
        self.fatal_reason = ""
        #: Set when the 24-hour quota stopped the batch: when to try again.
        self.quota_retry_s: float | None = None
        self.quota_deferred: list[Item] = []
        self.campaign_state = CampaignState.RUNNING.value

    def message_id(self, item: Item) -> str:
        return f"{self.campaign_id}.{item[0]}"

    async def flush(self) -> str:
        if self.pending and observers:
            for state, count in Counter(r.state.value for r in self.pending).items():
                for observer in observers:
                    observer.message_recorded(state, count)
        if self.pending:
            self.campaign_state = await self.rt.store.finish(self.campaign_id, self.pending)
            self.report.recorded += len(self.pending)
            self.pending = []
        return self.campaign_state

    async def classify(self, ready: _Ready, result: SendResult) -> None:
        s = self.rt.settings
        item, mid = ready.item, ready.message_id
        outcome = result.outcome
        for observer in observers:
            observer.message_outcome(outcome.value, priority="bulk")
        if outcome is Outcome.SENT:
            self.report.sent += 1
            self.pending.append(
                Transition(mid, MessageState.SENT, result.code, "", result.ses_message_id)
            )
        elif outcome is Outcome.THROTTLED:
            if not self.throttled:
                await self.rt.limiter.on_throttle()
            self.throttled.append(item)
            self.pending.append(Transition(mid, MessageState.RETRYING, result.code, result.reason))
        elif outcome is Outcome.QUOTA_EXHAUSTED:
            retry_s = await self.rt.quota.mark_exhausted()
            self.quota_retry_s = min(max(retry_s, 1.0), s.retry_max_s)
            self.quota_deferred.append(item)
            self.pending.append(Transition(mid, MessageState.DEFERRED, result.code, result.reason))
        elif outcome is Outcome.TRANSIENT:
            failures = int(item[3]) + 1
            if failures >= s.max_attempts:
                reason = f"{result.reason} (gave up after {failures} attempts)"
                self.pending.append(
                    Transition(mid, MessageState.FAILED, result.code, reason, row=item)
                )
            else:
                self.transient[failures].append([item[0], item[1], item[2], failures])
                self.pending.append(
                    Transition(mid, MessageState.RETRYING, result.code, result.reason)
                )
        elif outcome is Outcome.PERMANENT:
            self.pending.append(
                Transition(mid, MessageState.FAILED, result.code, result.reason, row=item)
            )
        elif outcome is Outcome.FATAL:
            self.fatal.append(item)
            self.fatal_reason = f"{result.code} {result.reason}" if result.code else result.reason
        elif s.resend_unknown and int(item[3]) + 1 < s.max_attempts:
            failures = int(item[3]) + 1
            self.transient[failures].append([item[0], item[1], item[2], failures])
            self.pending.append(
                Transition(
                    mid,
                    MessageState.RETRYING,
                    result.code,
                    f"outcome unknown, resending: {result.reason}",
                )
            )
        else:
            self.pending.append(
                Transition(mid, MessageState.UNKNOWN, result.code, result.reason, row=item)
            )

    def follow_ups(self) -> list[FollowUp]:
        s = self.rt.settings
        out = []
        if self.throttled:
            out.append(FollowUp(self.throttled, throttle_delay_s(s.throttle_retry_s), "throttled"))
        for failures, items in self.transient.items():
            delay = backoff_s(failures, base_s=s.retry_base_s, max_s=s.retry_max_s)
            out.append(FollowUp(items, delay, f"transient failure #{failures}"))
        return out


async def _park(rt: WorkerRuntime, batch: _Batch, items: Sequence[Item], reason: str) -> bool:
    """Park items of a paused campaign; False if it was resumed meanwhile."""
    payload = {"campaign_id": batch.campaign_id, "items": list(items)}
    ids = [batch.message_id(item) for item in items]
    state = await rt.store.park(batch.campaign_id, payload | {"message_ids": ids}, ids, reason)
    return state == CampaignState.PAUSED.value


async def process_batch(rt: WorkerRuntime, campaign_id: str, items: Sequence[Item]) -> BatchReport:
    batch = _Batch(rt, campaign_id)
    ids = [batch.message_id(item) for item in items]
    suppressed = await rt.store.suppressed([item[1] for item in items])
    state, claims = await rt.store.claim(
        campaign_id,
        [(mid, item[1], sup) for mid, item, sup in zip(ids, items, suppressed, strict=True)],
        lease_s=lease_for(rt, len(items)),
        token=rt.token,
    )
    batch.campaign_state = state
    if state == "missing":
        log.warning(
            "campaign %s has no record in the status store (Redis lost its data, or it "
            "expired): %d messages not sent",
            campaign_id,
            len(items),
        )
        return batch.report
    busy = [(item, c) for item, c in zip(items, claims, strict=True) if c.decision == "busy"]
    if busy:
        wait_s = max(c.retry_after_s for _, c in busy) + 1.0
        batch.report.follow_ups.append(
            FollowUp([i for i, _ in busy], wait_s, "held by another worker")
        )
    paused = [item for item, c in zip(items, claims, strict=True) if c.decision == "paused"]
    if paused and not await _park(rt, batch, paused, "campaign paused"):
        batch.report.follow_ups.append(FollowUp(paused, 0.0, "campaign resumed"))

    ready: list[_Ready] = []
    claimed = [(item, c) for item, c in zip(items, claims, strict=True) if c.go]
    template = await campaign_template(rt, campaign_id) if claimed else None
    for item, claim in claimed:
        if claim.recovered:
            log.warning("message %s: resending after its worker was lost", claim.message_id)
        try:
            if template is None:
                raise ValidationError("campaign", "template missing (expired or deleted)")
            rendered = template.render(item[1], item[2] or {}, message_id=claim.message_id)
        except ValidationError as exc:
            batch.pending.append(
                Transition(claim.message_id, MessageState.FAILED, 0, str(exc), row=item)
            )
            continue
        ready.append(_Ready(item, claim.message_id, rendered))

    sent_upto = await _send_all(rt, batch, ready)
    remaining = [r.item for r in ready[sent_upto:]]
    await batch.flush()

    if batch.fatal:
        reason = f"endpoint refused: {batch.fatal_reason}"
        await rt.store.pause(campaign_id, reason, kind="endpoint")
        log.error("campaign %s paused: %s", campaign_id, reason)
        remaining = batch.fatal + remaining
        batch.report.stopped = "fatal"
    if remaining:
        await _hold_back(rt, batch, remaining)
    batch.report.follow_ups.extend(batch.follow_ups())
    if batch.quota_retry_s is not None and batch.quota_deferred:
        batch.report.follow_ups.append(
            FollowUp(batch.quota_deferred, batch.quota_retry_s, "24-hour quota used up")
        )
    for follow_up in batch.report.follow_ups:
        for observer in observers:
            observer.retry_scheduled(follow_up.why, len(follow_up.items))
    return batch.report


async def _send_all(rt: WorkerRuntime, batch: _Batch, ready: list[_Ready]) -> int:
    """Send over the pool, a chunk of tokens at a time; returns how many were started."""
    s = rt.settings
    chunk_size = max(1, min(s.pool_size, int(s.burst)))
    inflight: set[asyncio.Task[tuple[_Ready, SendResult]]] = set()

    async def send_one(r: _Ready) -> tuple[_Ready, SendResult]:
        m = r.rendered
        started = time.perf_counter()
        result = await rt.pool.send(m.envelope_from, m.recipients, m.data)
        for observer in observers:
            observer.send_latency(time.perf_counter() - started)
        return r, result

    async def collect(done: set[asyncio.Task[tuple[_Ready, SendResult]]]) -> None:
        unused = 0
        for task in done:
            ready, result = task.result()
            await batch.classify(ready, result)
            if result.outcome not in SPENT:
                unused += len(ready.rendered.recipients)
        if unused:
            await rt.quota.release(unused)  # SES did not take them: give the quota back
        # One status write per chunk of outcomes, not per completion (each is a round trip);
        # whatever is left is flushed after the last send.
        if len(batch.pending) >= chunk_size:
            await batch.flush()

    started = 0
    while started < len(ready):
        if batch.campaign_state in STOP_STATES or batch.fatal or batch.quota_retry_s is not None:
            break
        chunk = ready[started : started + chunk_size]
        weight = sum(len(r.rendered.recipients) for r in chunk)
        decision = await rt.quota.try_consume(weight)
        if not decision.granted:
            batch.quota_retry_s = min(max(decision.retry_after_s, 1.0), s.retry_max_s)
            break
        waited_s = await rt.limiter.acquire(weight, priority=Priority.BULK)
        for observer in observers:
            observer.limiter_wait(waited_s, priority="bulk")
        for r in chunk:
            inflight.add(asyncio.create_task(send_one(r)))
        started += len(chunk)
        if len(inflight) >= 2 * chunk_size:
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            await collect(done)
    if inflight:
        done, _ = await asyncio.wait(inflight)
        await collect(done)
    return started


async def _hold_back(rt: WorkerRuntime, batch: _Batch, items: list[Item]) -> None:
    """Messages claimed but not sent: park, cancel or defer them, never drop them."""
    state = batch.campaign_state
    if batch.report.stopped == "fatal" or state == CampaignState.PAUSED.value:
        if await _park(rt, batch, items, "campaign paused"):
            return
        batch.report.follow_ups.append(FollowUp(items, 0.0, "campaign resumed"))
        return
    if state == CampaignState.CANCELLED.value:
        batch.pending = [
            Transition(batch.message_id(i), MessageState.CANCELLED, 0, "campaign cancelled")
            for i in items
        ]
        await batch.flush()
        return
    retry_s = batch.quota_retry_s if batch.quota_retry_s is not None else 0.0
    reason = f"24-hour sending quota used up; retrying in {retry_s:.0f} s"
    batch.pending = [
        Transition(batch.message_id(i), MessageState.DEFERRED, 0, reason) for i in items
    ]
    await batch.flush()
    await rt.store.set_campaign_fields(batch.campaign_id, deferred_reason=reason)
    batch.report.follow_ups.append(FollowUp(items, retry_s, "24-hour quota used up"))


def _record(
    message_id: str, state: MessageState, result: SendResult | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "state": state.value,
        "ses_message_id": result.ses_message_id if result else None,
        "code": result.code if result else 0,
        "reason": result.reason if result else "",
        **extra,
    }


async def process_message(
    rt: WorkerRuntime, message_id: str, spec: dict[str, Any], failures: int
) -> MessageDecision:
    """One transactional message: same claim/limit/send/record path, with priority."""
    s = rt.settings
    store = rt.store
    try:
        rendered = render_message(MessageSpec.model_validate(spec), max_bytes=s.max_message_bytes)
    except ValidationError as exc:
        rendered = None
        error = str(exc)
    except Exception as exc:  # pydantic errors from a hand-made spec
        rendered = None
        error = f"invalid message: {exc}"
    first = (
        rendered.recipients[0]
        if rendered
        else str(spec.get("to", [""])[0] if spec.get("to") else "")
    )
    flags = await store.suppressed(rendered.recipients) if rendered else []
    all_suppressed = bool(flags) and all(flags)
    _, (claim,) = await store.claim(
        TRANSACTIONAL,
        [(message_id, first, all_suppressed)],
        lease_s=lease_for(rt, 1),
        token=rt.token,
    )
    if claim.decision.startswith("skip:"):
        record = await _stored(rt, message_id)
        return MessageDecision(record)
    if claim.decision == "busy":
        return MessageDecision(
            _record(message_id, MessageState.SENDING), claim.retry_after_s + 1.0, failures
        )
    if claim.decision == "suppressed":
        return MessageDecision(
            _record(
                message_id, MessageState.SUPPRESSED, reason="recipient is on the suppression list"
            )
        )
    if rendered is None:
        await store.finish(TRANSACTIONAL, [Transition(message_id, MessageState.FAILED, 0, error)])
        return MessageDecision(_record(message_id, MessageState.FAILED, reason=error))
    recipients = [r for r, sup in zip(rendered.recipients, flags, strict=True) if not sup]

    decision = await rt.quota.try_consume(len(recipients))
    if not decision.granted:
        reason = "24-hour sending quota used up"
        await store.finish(
            TRANSACTIONAL, [Transition(message_id, MessageState.DEFERRED, 0, reason)]
        )
        delay = min(max(decision.retry_after_s, 1.0), s.retry_max_s)
        return MessageDecision(
            _record(message_id, MessageState.DEFERRED, reason=reason), delay, failures
        )
    waited_s = await rt.limiter.acquire(len(recipients), priority=Priority.TRANSACTIONAL)
    started = time.perf_counter()
    result = await rt.pool.send(rendered.envelope_from, recipients, rendered.data)
    for observer in observers:
        observer.limiter_wait(waited_s, priority="transactional")
        observer.send_latency(time.perf_counter() - started)
        observer.message_outcome(result.outcome.value, priority="transactional")

    state, retry_in, keep_row = _single_outcome(rt, result, failures)
    if result.outcome not in SPENT:
        await rt.quota.release(len(recipients))
    if result.outcome is Outcome.THROTTLED:
        await rt.limiter.on_throttle()
    elif result.outcome is Outcome.QUOTA_EXHAUSTED:
        await rt.quota.mark_exhausted()
    if result.outcome in (Outcome.TRANSIENT, Outcome.UNKNOWN):
        failures += 1  # both spend the attempt budget; throttles and deferrals do not
    for observer in observers:
        observer.message_recorded(state.value, 1)
        if retry_in is not None:
            observer.retry_scheduled(result.outcome.value, 1)
    await store.finish(
        TRANSACTIONAL,
        [
            Transition(
                message_id,
                state,
                result.code,
                result.reason,
                result.ses_message_id,
                row=spec if keep_row else None,
            )
        ],
    )
    return MessageDecision(_record(message_id, state, result), retry_in, failures)


def _single_outcome(
    rt: WorkerRuntime, result: SendResult, failures: int
) -> tuple[MessageState, float | None, bool]:
    s = rt.settings
    match result.outcome:
        case Outcome.SENT:
            return MessageState.SENT, None, False
        case Outcome.THROTTLED:
            return MessageState.RETRYING, throttle_delay_s(s.throttle_retry_s), False
        case Outcome.QUOTA_EXHAUSTED:
            return MessageState.DEFERRED, s.retry_max_s, False
        case Outcome.TRANSIENT if failures + 1 < s.max_attempts:
            return (
                MessageState.RETRYING,
                backoff_s(failures + 1, base_s=s.retry_base_s, max_s=s.retry_max_s),
                False,
            )
        case Outcome.TRANSIENT | Outcome.PERMANENT:
            return MessageState.FAILED, None, True
        case Outcome.FATAL:
            return MessageState.DEFERRED, s.retry_max_s, False
        case _ if s.resend_unknown and failures + 1 < s.max_attempts:
            return (
                MessageState.RETRYING,
                backoff_s(failures + 1, base_s=s.retry_base_s, max_s=s.retry_max_s),
                False,
            )
        case _:
            return MessageState.UNKNOWN, None, True


async def _stored(rt: WorkerRuntime, message_id: str) -> dict[str, Any]:
    raw = await rt.redis.hgetall(rt.store.keys.message(message_id))
    record = parse_message(message_id, raw)
    if record is None:
        return _record(message_id, MessageState.QUEUED)
    return {
        "message_id": message_id,
        "state": record.state.value,
        "ses_message_id": record.ses_message_id,
        "code": record.code,
        "reason": record.reason,
    }
