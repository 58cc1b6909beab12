"""A 1,000,000-recipient campaign from the producer's side: time to enqueue from a CSV file,
the producer's peak RSS, and the campaign status query time at that size.

No workers run: the batches stay stored in Redis for the dispatcher, and the broker holds
none (``broker_tasks``); ``redis_mb`` is what the stored campaign adds to Redis's memory.
Everything lives under a fresh ``SES_TASKS_KEY_PREFIX`` and is deleted at the end. The
producer runs in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
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
    env_for_subprocess,
    new_prefix,
    note,
)


def write_csv(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("email,name\n")
        for start in range(0, count, 10_000):
            handle.write(
                "".join(
                    f"user{i}@example.com,User {i}\n"
                    for i in range(start, min(count, start + 10_000))
                )
            )
    return path


def produce(csv_path: str, redis_url: str, prefix: str, queries: int) -> dict[str, Any]:
    """The producer process: enqueue, then time status queries."""
    from ses_tasks.config import Settings
    from ses_tasks.produce.client import SesTasks
    from ses_tasks.smtp.endpoint import PortMode

    settings = Settings(
        redis_url=redis_url,
        broker_url=redis_url,
        key_prefix=prefix,
        host="localhost",
        port=2587,
        mode=PortMode.STARTTLS,
    )
    client = SesTasks(settings)
    client.redis.ping()
    client.app.connection_for_write().ensure_connection()
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    status = client.send_campaign(
        from_=SENDER, subject=SUBJECT, text=TEXT, html=HTML, recipients=csv_path,
        campaign_id="million",
    )  # fmt: skip
    enqueue_s = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(queries):
        t0 = time.perf_counter()
        client.campaign_status("million")
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "recipients": status.total,
        "enqueue_s": enqueue_s,
        "recipients_per_s": status.total / enqueue_s,
        "producer_peak_rss_mb": peak_kb / 1024,
        "rss_before_enqueue_mb": rss_before_kb / 1024,
        "status_p50_ms": 1000 * statistics.median(times),
        "status_p99_ms": 1000 * times[int(0.99 * (len(times) - 1))],
        "batch_size": settings.batch_size,
    }


def run(*, redis_url: str, workdir: Path, count: int, queries: int = 200) -> dict[str, Any]:
    client = check_redis(redis_url)
    csv_path = workdir / f"recipients-{count}.csv"
    if not csv_path.exists():
        note(f"writing {count:,} recipients to {csv_path}")
        write_csv(csv_path, count)
    prefix = new_prefix("million")
    memory_before = int(client.info("memory")["used_memory"])
    try:
        out = subprocess.run(
            [
                sys.executable, "-m", "bench.million", "--child", "--csv", str(csv_path),
                "--redis-url", redis_url, "--prefix", prefix, "--queries", str(queries),
            ],
            check=True, capture_output=True, text=True, env=env_for_subprocess(), timeout=900,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        broker_len = client.llen(f"{prefix}:broker:ses.starttls")
        result["broker_tasks"] = broker_len
        result["redis_mb"] = (int(client.info("memory")["used_memory"]) - memory_before) / 2**20
    finally:
        deleted = delete_prefix(client, prefix)
        note(f"million: deleted {deleted} keys under {prefix}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(produce(args.csv, args.redis_url, args.prefix, args.queries)))
        return
    result = run(redis_url=args.redis_url, workdir=Path(args.workdir), count=args.count,
                 queries=args.queries)  # fmt: skip
    emit("million", **result)


if __name__ == "__main__":
    main()
