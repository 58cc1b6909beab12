"""Fair share between campaigns on one fleet: one JSON line per scenario.

``behind``: campaign A (``--big`` recipients) saturates the rate limit; B (``--small``)
starts ``--delay`` seconds later. Reports B's first send and completion against its fair
share (``small / (rate / 2)``). A pre-filled FIFO queue would hold B behind A's whole
backlog: ``(big - rate x delay) / rate`` seconds, printed next to it.

``weights``: two campaigns of ``--weighted`` recipients each, weights 3 and 1, started
together; the split of sends while both run (after the first second's burst).

Real processes: the recording sandbox (per-reply latency ``--latency-ms``), two worker
processes, Redis at ``--redis-url``; keys under a fresh prefix, deleted at the end.

    python -m bench.fairness --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_REDIS_URL,
    SANDBOX_PASSWORD,
    Workers,
    check_redis,
    delete_prefix,
    emit,
    new_prefix,
    note,
)
from ses_tasks.config import Settings
from ses_tasks.produce.client import SesTasks
from ses_tasks.sandbox.embedded import SandboxProcess, wait_for

TEMPLATE = dict(from_="news@example.com", subject="Hi {{ email }}", text="Hello {{ email }}")


def _client(env: dict[str, str]) -> SesTasks:
    return SesTasks(Settings(**{k.removeprefix("SES_TASKS_").lower(): v for k, v in env.items()}))


def _times(sandbox: SandboxProcess, prefix: str) -> list[float]:
    return sorted(
        m["received_at"] for m in sandbox.accepted() if m["rcpt_tos"][0].startswith(prefix)
    )


def _wait_done(client: SesTasks, campaign_id: str, timeout_s: float = 300) -> None:
    wait_for(
        lambda: client.campaign_status(campaign_id).done,
        timeout_s=timeout_s,
        interval_s=0.05,
        what=campaign_id,
    )


def _recipients(tag: str, n: int) -> list[str]:
    return [f"{tag}{i}@example.com" for i in range(n)]


def behind(client: SesTasks, sandbox: SandboxProcess, run: int, args: Any) -> dict[str, Any]:
    a, b = f"a{run}-", f"b{run}-"
    client.send_campaign(recipients=_recipients(a, args.big), campaign_id=f"big{run}", **TEMPLATE)
    wait_for(
        lambda: client.campaign_status(f"big{run}").counts["sent"] >= args.rate * args.delay,
        timeout_s=120,
        what="the big campaign to saturate the limit",
    )
    started = time.time()
    client.send_campaign(
        recipients=_recipients(b, args.small), campaign_id=f"small{run}", **TEMPLATE
    )
    _wait_done(client, f"small{run}")
    _wait_done(client, f"big{run}")
    b_times = _times(sandbox, b)
    fair_s = args.small / (args.rate / 2)
    return {
        "first_send_s": round(b_times[0] - started, 3),
        "done_s": round(b_times[-1] - started, 3),
        "fair_share_s": fair_s,
        "done_over_fair": round((b_times[-1] - started) / fair_s, 2),
        "fifo_wait_s": round((args.big - args.rate * args.delay) / args.rate, 1),
    }


def weights(client: SesTasks, sandbox: SandboxProcess, run: int, args: Any) -> dict[str, Any]:
    h, light = f"h{run}-", f"l{run}-"
    threads = [
        threading.Thread(
            target=client.send_campaign,
            kwargs=dict(
                recipients=_recipients(tag, args.weighted), campaign_id=cid, weight=w, **TEMPLATE
            ),
        )
        for tag, cid, w in ((h, f"heavy{run}", 3.0), (light, f"light{run}", 1.0))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait_done(client, f"heavy{run}")
    _wait_done(client, f"light{run}")
    th, tl = _times(sandbox, h), _times(sandbox, light)
    lo, hi = max(th[0], tl[0]) + 1.0, min(th[-1], tl[-1]) - 0.5
    nh, nl = sum(lo <= t < hi for t in th), sum(lo <= t < hi for t in tl)
    return {
        "window_s": round(hi - lo, 2),
        "heavy_per_s": round(nh / (hi - lo), 1),
        "light_per_s": round(nl / (hi - lo), 1),
        "split": round(nh / nl, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--big", type=int, default=1500)
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--delay", type=float, default=5.0)
    parser.add_argument("--weighted", type=int, default=900)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    redis_client = check_redis(args.redis_url)
    prefix = new_prefix("fair")
    with tempfile.TemporaryDirectory(prefix="ses-bench-fair-") as tmp:
        workdir = Path(tmp)
        sandbox = SandboxProcess(
            workdir, password=SANDBOX_PASSWORD, args=["--latency-ms", str(args.latency_ms)]
        ).start()
        env = {
            **sandbox.settings_env("starttls"),
            "SES_TASKS_REDIS_URL": args.redis_url,
            "SES_TASKS_BROKER_URL": args.redis_url,
            "SES_TASKS_KEY_PREFIX": prefix,
            "SES_TASKS_MAX_SEND_RATE": str(args.rate),
            "SES_TASKS_POOL_SIZE": "5",
            "SES_TASKS_POOL_MIN_SIZE": "5",
        }
        workers = Workers(env, workdir, processes=2).start()
        try:
            workers.wait_ready()
            client = _client(env)
            results: dict[str, list[dict[str, Any]]] = {"behind": [], "weights": []}
            for run in range(args.runs):
                for name, scenario in (("behind", behind), ("weights", weights)):
                    note(f"fairness: {name} run {run + 1}/{args.runs}")
                    result = scenario(client, sandbox, run, args)
                    results[name].append(result)
                    emit("fairness", scenario=name, run=run, rate=args.rate, **result)
            for name, rows in results.items():
                keys = [k for k in rows[0] if isinstance(rows[0][k], int | float)]
                medians = {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}
                emit("fairness", scenario=name, run="median", rate=args.rate, **medians)
        finally:
            workers.stop()
            sandbox.stop()
            delete_prefix(redis_client, prefix)


if __name__ == "__main__":
    main()
