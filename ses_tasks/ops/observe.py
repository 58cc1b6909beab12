"""Hooks the delivery path calls, so metrics (or anything else) can watch it.

The delivery code never imports prometheus-client; ``ses_tasks.ops.metrics`` registers an
``Observer`` when metrics are enabled. With no observer, each hook is one empty loop.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Observer", "observers", "register"]


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


observers: list[Observer] = []


def register(observer: Observer) -> None:
    if observer not in observers:
        observers.append(observer)
