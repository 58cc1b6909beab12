"""Hooks the delivery path calls, so metrics (or anything else) can watch it.

The delivery code never imports prometheus-client; ``ses_tasks.ops.metrics`` registers an
``Observer`` when metrics are enabled. With no observer, each hook is one empty loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ses_tasks.store.tracking import Claim, Transition
    from ses_tasks.worker.delivery import BatchJob

__all__ = [
    "Observer",
    "RecordObserver",
    "claims_recorded",
    "observers",
    "register",
    "transitions_recorded",
]


class Observer(Protocol):
    def message_outcome(self, outcome: str, *, priority: str) -> None:
        """One SMTP transaction ended (``sent``, ``throttled``, ``transient`` ...)."""

    def message_recorded(self, state: str, count: int) -> None:
        """``count`` messages were recorded in ``state`` (final or not)."""

    def send_latency(self, seconds: float) -> None:
        """Time from handing a message to the pool to SES's reply."""

    def limiter_wait(self, seconds: float, *, priority: str) -> None:
        """Time spent waiting for fleet rate-limit tokens."""

    def retry_scheduled(self, why: str, count: int) -> None:
        """``count`` messages will be tried again (throttle, transient, quota, busy ...)."""


class RecordObserver(Observer, Protocol):
    """An observer that also sees what was recorded, message by message (optional hooks:
    observers without them are skipped). The delivery events (``ses_tasks.events``) are
    built from these."""

    def transitions_recorded(self, job: BatchJob, transitions: Sequence[Transition]) -> None:
        """``transitions`` of ``job``'s messages were written to the status store."""

    def claims_recorded(self, job: BatchJob, claims: Sequence[Claim]) -> None:
        """The claim of ``job`` recorded some messages itself (``suppressed``, ...)."""


observers: list[Observer] = []


def register(observer: Observer) -> None:
    if observer not in observers:
        observers.append(observer)


def transitions_recorded(job: BatchJob, transitions: Sequence[Transition]) -> None:
    """Tell each observer that has the hook; never raises into the delivery path."""
    for observer in observers:
        hook = getattr(observer, "transitions_recorded", None)
        if hook is not None:
            _safely(hook, job, transitions)


def claims_recorded(job: BatchJob, claims: Sequence[Claim]) -> None:
    for observer in observers:
        hook = getattr(observer, "claims_recorded", None)
        if hook is not None:
            _safely(hook, job, claims)


def _safely(hook: object, *args: object) -> None:
    try:
        hook(*args)  # type: ignore[operator]
    except Exception:
        logging.getLogger(__name__).exception("observer %r failed", hook)
