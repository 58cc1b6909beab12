"""Transactional latency, enqueue to ``sent``, while idle and while a campaign runs.

Deployment as recommended: bulk workers (2 processes) and a transactional worker
(1 process) on their own queues. Latency is from just before ``send_email`` to the
``updated_at`` of the message's ``sent`` record (Redis server clock, same machine, ms).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import HTML, SENDER, SUBJECT, TEXT, LeanSandbox, median, note
from .throughput import Ours


def _percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, round(q * (len(data) - 1)))]


def _measure(ours: Ours, count: int, tag: str) -> list[float]:
    client = ours.client
    out = []
    for i in range(count):
        started = time.time()
        result = client.send_email(
            from_="app@example.com", to=[f"{tag}{i}@example.com"], subject="Your code",
            text=f"Your code is {i:06d}.",
        )  # fmt: skip
        record = result.get(timeout=60)
        if record["state"] != "sent":
            raise RuntimeError(f"transactional message not sent: {record}")
        status = client.message_status(result.message_id)
        assert status is not None and status.updated_at is not None
        out.append(1000 * (status.updated_at - started))
    return out


def run(
    sandbox: LeanSandbox,
    *,
    redis_url: str,
    workdir: Path,
    connections: int,
    count: int,
    campaign_size: int,
) -> dict[str, Any]:
    bulk = Ours(
        sandbox, redis_url=redis_url, workdir=workdir, connections=connections, processes=2,
        queues="bulk",
    )  # fmt: skip
    # The transactional worker shares the bulk workers' prefix (same store, same broker).
    bulk.workers.start()
    env = dict(bulk.env, SES_TASKS_POOL_SIZE="4", SES_TASKS_POOL_MIN_SIZE="4")
    from .common import Workers

    tx = Workers(env, workdir, processes=1, queues="transactional").start()
    try:
        bulk.workers.wait_ready()
        tx.wait_ready()
        bulk.run(200, quiet=True)  # warm the bulk side
        _measure(bulk, 5, "warm")
        idle = _measure(bulk, count, "idle")
        campaign_id = "latency-load"
        rows = [{"email": f"load{i}@example.com", "name": f"L {i}"} for i in range(campaign_size)]
        bulk.client.send_campaign(
            from_=SENDER, subject=SUBJECT, text=TEXT, html=HTML, recipients=rows,
            campaign_id=campaign_id,
        )  # fmt: skip
        time.sleep(0.5)  # let the campaign reach full speed
        loaded = _measure(bulk, count, "busy")
        status = bulk.client.campaign_status(campaign_id)
        still_running = status.open > 0
        if not still_running:
            note("latency: the campaign finished before the loaded measurement ended")
        bulk.client.cancel(campaign_id)
    finally:
        tx.stop()
        bulk.stop()
    return {
        "count": count,
        "idle_p50_ms": median(idle),
        "idle_p99_ms": _percentile(idle, 0.99),
        "loaded_p50_ms": median(loaded),
        "loaded_p99_ms": _percentile(loaded, 0.99),
        "campaign_still_running": still_running,
        "campaign_sent_meanwhile": status.counts.get("sent", 0),
    }
