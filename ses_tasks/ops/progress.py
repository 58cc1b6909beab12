"""Terminal output with rich: progress bars for long work, tables for status."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ses_tasks.ops.schedule import ScheduledCampaign, format_eta
from ses_tasks.produce.options import format_epoch
from ses_tasks.store.tracking import COUNTERS, CampaignStatus

__all__ = ["enqueue_progress", "schedule_table", "status_table", "wait_progress"]

console = Console(stderr=True)
POLL_S = 0.2


def _count_lines(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            return max(0, sum(1 for _ in handle) - (1 if path.suffix.lower() == ".csv" else 0))
    except OSError:
        return None


@contextlib.contextmanager
def enqueue_progress(path: Path | None, *, quiet: bool) -> Iterator[Callable[[int], None]]:
    if quiet:
        yield lambda _n: None
        return
    total = _count_lines(path) if path is not None else None
    with Progress(
        TextColumn("enqueue"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("enqueue", total=total)
        yield lambda n: bar.advance(task, n)


def wait_progress(
    client: Any, campaign_id: str, *, quiet: bool, timeout_s: float | None = None
) -> CampaignStatus:
    """Poll the campaign until every message is final (or it is paused/cancelled)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = client.campaign_status(campaign_id)

    def finished(s: CampaignStatus) -> bool:
        # A paused campaign keeps its parked messages deferred: stop waiting once nothing
        # is queued, sending or retrying, and let the caller show why it paused.
        moving = sum(s.counts.get(name, 0) for name in ("queued", "sending", "retrying"))
        return s.done or (s.state.value in ("paused", "cancelled") and moving == 0)

    if quiet:
        while not finished(status) and (deadline is None or time.monotonic() < deadline):
            time.sleep(POLL_S)
            status = client.campaign_status(campaign_id)
        return status
    with Progress(
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("send", total=status.total, state=status.state.value, counts="")
        while True:
            done = status.total - status.open
            counts = " ".join(f"{n}={status.counts[n]}" for n in COUNTERS if status.counts.get(n))
            bar.update(
                task, completed=done, total=status.total, state=status.state.value, counts=counts
            )
            if finished(status) or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(POLL_S)
            status = client.campaign_status(campaign_id)


def status_table(status: CampaignStatus, planned: ScheduledCampaign | None = None) -> None:
    waiting = " (scheduled)" if status.scheduled else ""
    table = Table(title=f"campaign {status.id}: {status.state.value}{waiting}", show_header=False)
    table.add_row("total", str(status.total))
    if status.send_at is not None:
        when = format_epoch(status.send_at)
        table.add_row("send at", f"{when} (nothing sent before)" if status.scheduled else when)
    for name in COUNTERS:
        table.add_row(name, str(status.counts.get(name, 0)))
    table.add_row("swept", f"{status.swept} batches republished by the sweeper")
    if planned is not None:
        table.add_row(
            "share",
            f"{planned.share:.0%} of the rate (weight {planned.weight:g}), "
            f"{planned.rate_per_s:.1f}/s",
        )
        table.add_row("eta", format_eta(planned.eta_s))
    if status.reason:
        table.add_row("reason", status.reason)
    Console().print(table)


def schedule_table(planned: list[ScheduledCampaign], rates: dict[str, float]) -> None:
    shown = ", ".join(f"{name or 'default'} {rate:g}/s" for name, rate in rates.items())
    table = Table(title=f"active campaigns (rates: {shown})")
    for name in ("campaign", "state", "profile", "weight", "share", "sent / total", "eta"):
        table.add_column(name, justify="left" if name in ("campaign", "state") else "right")
    for p in planned:
        s = p.status
        table.add_row(
            s.id,
            f"{s.state.value}, starts {format_epoch(s.send_at or 0)}"
            if s.scheduled
            else s.state.value,
            s.meta.get("profile") or "default",
            f"{p.weight:g}",
            f"{p.share:.0%}",
            f"{s.counts.get('sent', 0)} / {s.total}",
            format_eta(p.eta_s),
        )
    Console().print(table)
