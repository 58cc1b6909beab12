"""Dashboard page times with a 1,000,000-recipient campaign and 50 campaigns in the store.

Seeds a fresh key prefix through the real producer and the real ``finish`` script: one
1,000,000-recipient campaign (``--sent`` of its messages recorded sent and ``--failed``
recorded failed, spread over the last two hours of its timeline), 49 campaigns of 1,000,
and ``--suppressed`` suppression entries. Then times every page, in process, through
Starlette's ``TestClient`` (one wall-clock time per request: an upper bound on server time,
no network in it). No workers run; the batches stay stored. Everything under the prefix is
deleted at the end.

    python -m bench.dashboard                     # the issue's size
    python -m bench.dashboard --count 100000      # a quicker look
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from html import unescape
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_REDIS_URL,
    HTML,
    SENDER,
    SUBJECT,
    TEXT,
    check_redis,
    delete_prefix,
    emit,
    new_prefix,
    note,
)
from .million import write_csv

BIG = "million"
SPREAD_S = 7200
CHUNK = 2000
NEXT_LINK = re.compile(r"<a\b[^>]*\brel=\"next\"[^>]*>")
HREF = re.compile(r"\bhref=\"([^\"]+)\"")


def _settings(redis_url: str, prefix: str) -> Any:
    from ses_tasks.config import Settings
    from ses_tasks.smtp.endpoint import PortMode

    return Settings(
        redis_url=redis_url,
        broker_url=redis_url,
        key_prefix=prefix,
        host="localhost",
        port=2587,
        mode=PortMode.STARTTLS,
    )


def seed(settings: Any, csv_path: Path, *, count: int, sent: int, failed: int,
         small: int, suppressed: int) -> dict[str, float]:  # fmt: skip
    """Fill the store through the producer and the ``finish`` script; returns timings."""
    from ses_tasks.produce.client import SesTasks
    from ses_tasks.states import MessageState
    from ses_tasks.store.tracking import Transition

    client = SesTasks(settings)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    client.send_campaign(
        from_=SENDER, subject=SUBJECT, text=TEXT, html=HTML, recipients=str(csv_path),
        campaign_id=BIG,
    )  # fmt: skip
    timings["enqueue_big_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for n in range(small):
        client.send_campaign(
            from_=SENDER, subject=SUBJECT, text=TEXT,
            recipients=[f"c{n}-{i}@example.com" for i in range(1000)],
            campaign_id=f"c{n:02d}",
        )  # fmt: skip
    timings["enqueue_small_s"] = time.perf_counter() - t0

    # Outcomes through the real script, the clock walked across the last two hours so the
    # timeline has that many buckets.
    t0 = time.perf_counter()
    store = client.store
    start = time.time() - SPREAD_S
    marked = sent + failed
    for first in range(0, marked, CHUNK):
        last = min(marked, first + CHUNK)
        store.clock = lambda f=first: start + SPREAD_S * f / marked
        outcomes = []
        for seq in range(first, last):
            if seq % max(1, marked // max(1, failed)) == 0 and failed:
                outcomes.append(Transition(
                    f"{BIG}.{seq}", MessageState.FAILED, 550,
                    "554 Message rejected: Email address is not verified.",
                    row={"email": f"user{seq}@example.com", "name": f"User {seq}"},
                ))  # fmt: skip
            else:
                outcomes.append(
                    Transition(f"{BIG}.{seq}", MessageState.SENT, 250, "Ok", f"ses-{seq}")
                )
        store.finish(BIG, outcomes)
    store.clock = time.time
    timings["record_outcomes_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for first in range(0, suppressed, CHUNK):
        emails = [f"gone{i}@example.org" for i in range(first, min(suppressed, first + CHUNK))]
        client.suppress(emails, reason="bounced")
    timings["suppress_s"] = time.perf_counter() - t0
    return timings


def time_pages(settings: Any, runs: int) -> list[dict[str, Any]]:
    from starlette.testclient import TestClient

    from ses_tasks.dashboard import create_app

    app = create_app(settings=settings)
    results = []
    with TestClient(app, base_url="http://127.0.0.1") as http:
        page = http.get(f"/campaigns/{BIG}")
        page.raise_for_status()
        link = NEXT_LINK.search(page.text)
        href = HREF.search(link.group(0)) if link else None
        paths = [
            "/static/dashboard.css",  # the floor: the same client, middleware and headers
            "/",
            f"/campaigns/{BIG}",
            *([unescape(href.group(1))] if href else []),
            "/campaigns/c00",
            "/suppression",
            "/suppression?q=gone4242",
            "/limits",
            "/workers",
        ]
        for path in paths:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                response = http.get(path)
                times.append(1000 * (time.perf_counter() - t0))
                response.raise_for_status()
            times.sort()
            results.append({
                "path": path,
                "p50_ms": round(statistics.median(times), 2),
                "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
                "max_ms": round(times[-1], 2),
                "bytes": len(response.content),
            })  # fmt: skip
        floor = results[0]["p50_ms"]
        for result in results:
            result["vs_static_floor"] = round(result["p50_ms"] / floor, 1)
        t0 = time.perf_counter()
        csv_response = http.get(f"/campaigns/{BIG}/failures.csv")
        csv_response.raise_for_status()
        csv_s = time.perf_counter() - t0
        # The baseline: the CLI's export (``ses-tasks campaign failures``), the sync store.
        from ses_tasks.produce.client import SesTasks

        t0 = time.perf_counter()
        cli_rows = sum(1 for _ in SesTasks(settings).failures(BIG))
        cli_s = time.perf_counter() - t0
        results.append({
            "path": f"/campaigns/{BIG}/failures.csv",
            "whole_s": round(csv_s, 2),
            "rows": csv_response.text.count("\n") - 1,
            "cli_failures_s": round(cli_s, 2),
            "cli_rows": cli_rows,
            "vs_cli": round(csv_s / cli_s, 2),
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--sent", type=int, default=400_000)
    parser.add_argument("--failed", type=int, default=100_000)
    parser.add_argument("--campaigns", type=int, default=50)
    parser.add_argument("--suppressed", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--workdir", default="/tmp")
    args = parser.parse_args()

    redis = check_redis(args.redis_url)
    csv_path = Path(args.workdir) / f"recipients-{args.count}.csv"
    if not csv_path.exists():
        note(f"writing {args.count:,} recipients to {csv_path}")
        write_csv(csv_path, args.count)
    prefix = new_prefix("dashboard")
    settings = _settings(args.redis_url, prefix)
    try:
        note(f"seeding under {prefix}")
        timings = seed(
            settings, csv_path, count=args.count, sent=args.sent, failed=args.failed,
            small=args.campaigns - 1, suppressed=args.suppressed,
        )  # fmt: skip
        emit("dashboard-seed", recipients=args.count, campaigns=args.campaigns,
             sent=args.sent, failed=args.failed, suppressed=args.suppressed,
             **{k: round(v, 1) for k, v in timings.items()})  # fmt: skip
        for result in time_pages(settings, args.runs):
            emit("dashboard-page", **result)
    finally:
        note(f"dashboard: deleted {delete_prefix(redis, prefix)} keys under {prefix}")


if __name__ == "__main__":
    main()
