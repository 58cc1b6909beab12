"""Run every benchmark and print one JSON line per result (stdout); progress on stderr.

    python -m bench.run                 # the full run (about 10 minutes on 2 cores)
    python -m bench.run --quick         # one run per case, fewer cases (about 3 minutes)
    python -m bench.run --only throughput --latency 20 --connections 10

Starts what it needs: checks Redis, starts the sandbox in its fast mode (no message
bytes kept, no JSONL store or event log) with the per-reply latency of each case, and real
worker processes. Each throughput/CPU case runs ours and the three baselines in the same
sandbox, interleaved, ``--runs`` times, and reports medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import latency as latency_bench
from . import million as million_bench
from .baselines import Recipe, run_loop
from .common import (
    DEFAULT_REDIS_URL,
    check_redis,
    emit,
    env_for_subprocess,
    lean_sandbox,
    machine,
    median,
    note,
)
from .throughput import Ours, batch_size_for

#: SES answers MAIL, RCPT, DATA and the end of data one at a time (no PIPELINING).
ROUND_TRIPS_PER_MESSAGE = 4
PROCESSES = 2
#: Aim for runs of about this long, so a run is long against start-up noise.
RUN_TARGET_S = 2.5


def counts_for(latency_ms: float, connections: int, quick: bool) -> tuple[int, int]:
    """(messages for ours and the loops, messages for the common recipe)."""
    scale = 0.5 if quick else 1.0
    # Whole rounds of batches: each worker process gets the same number of batches, so the
    # run does not end with one process sending alone.
    per_round = PROCESSES * batch_size_for(max(1, connections // PROCESSES))

    def whole(n: float) -> int:
        return max(per_round, round(n / per_round) * per_round)

    if latency_ms <= 0:
        return whole(3000 * scale), int(400 * scale)
    rtt_s = ROUND_TRIPS_PER_MESSAGE * latency_ms / 1000 + 0.008
    expected = min(connections / rtt_s, 1200)
    ours = whole(max(300, min(3000, expected * RUN_TARGET_S)) * scale)
    # The recipe pays ~10 round trips and a TLS handshake per message.
    recipe_rate = min(connections / (2.5 * rtt_s), 200)
    recipe = int(max(100, min(600, recipe_rate * RUN_TARGET_S)) * scale)
    return ours, recipe


def throughput_case(
    *, latency_ms: float, connections: int, runs: int, redis_url: str, workdir: Path,
    quick: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    count, recipe_count = counts_for(latency_ms, connections, quick)
    note(f"case latency={latency_ms} ms connections={connections}: {count} messages, "
         f"recipe {recipe_count}")  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": [], "floor": [], "recipe": []}
    with lean_sandbox(workdir, latency_ms) as sandbox:
        ours = Ours(
            sandbox, redis_url=redis_url, workdir=workdir, connections=connections,
            processes=PROCESSES,
        ).start()  # fmt: skip
        recipe: Recipe | None = None
        try:
            recipe = Recipe(
                sandbox, redis_url=redis_url, workdir=workdir, connections=connections,
                processes=PROCESSES,
            ).start()  # fmt: skip
            for run in range(runs):
                for kind in ("floor", "bare"):
                    r = run_loop(
                        kind, sandbox, connections=connections, processes=PROCESSES, count=count
                    )
                    results[kind].append(r)
                results["ours"].append(ours.run(count))
                results["recipe"].append(recipe.run(recipe_count))
                note(
                    f"  run {run + 1}/{runs}: "
                    + ", ".join(f"{k} {v[-1]['msgs_per_s']:.0f}/s" for k, v in results.items())
                )
        finally:
            if recipe is not None:
                recipe.stop()
            ours.stop()
    out = []
    med = {
        kind: {
            key: median(r[key] for r in rs)
            for key in ("msgs_per_s", "cpu_s_per_1000", "sandbox_cpu_s_per_1000")
        }
        for kind, rs in results.items()
    }
    for kind, m in med.items():
        out.append(
            {
                "bench": "throughput",
                "impl": kind,
                "latency_ms": latency_ms,
                "connections": connections,
                "processes": PROCESSES,
                "runs": runs,
                "messages": recipe_count if kind == "recipe" else count,
                "msgs_per_s": round(m["msgs_per_s"], 1),
                "worker_cpu_s_per_1000": round(m["cpu_s_per_1000"], 3),
                "sandbox_cpu_s_per_1000": round(m["sandbox_cpu_s_per_1000"], 3),
                "all_msgs_per_s": [round(r["msgs_per_s"], 1) for r in results[kind]],
            }
        )
    ours_m = med["ours"]
    latency_bound = (
        connections / (ROUND_TRIPS_PER_MESSAGE * latency_ms / 1000) if latency_ms > 0 else None
    )
    capacity = med["floor"]["msgs_per_s"]
    bound = min(latency_bound, capacity) if latency_bound is not None else capacity
    out.append(
        {
            "bench": "ratios",
            "latency_ms": latency_ms,
            "connections": connections,
            "throughput_vs_recipe": round(ours_m["msgs_per_s"] / med["recipe"]["msgs_per_s"], 2),
            "throughput_vs_bound": round(ours_m["msgs_per_s"] / bound, 3),
            "bound_msgs_per_s": round(bound, 1),
            "latency_bound_msgs_per_s": None if latency_bound is None else round(latency_bound, 1),
            "floor_msgs_per_s": round(capacity, 1),
            "cpu_vs_bare": round(ours_m["cpu_s_per_1000"] / med["bare"]["cpu_s_per_1000"], 3),
            "cpu_vs_floor": round(ours_m["cpu_s_per_1000"] / med["floor"]["cpu_s_per_1000"], 3),
            "cpu_vs_recipe": round(ours_m["cpu_s_per_1000"] / med["recipe"]["cpu_s_per_1000"], 3),
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--latency", type=float, action="append", help="ms; repeatable")
    parser.add_argument("--connections", type=int, action="append", help="repeatable")
    parser.add_argument(
        "--only",
        action="append",
        choices=["throughput", "latency", "million", "limiter"],
        help="repeatable; default: all",
    )
    parser.add_argument("--million-count", type=int, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    quick = args.quick
    runs = args.runs or (1 if quick else 3)
    latencies = args.latency or [0.0, 20.0]
    connections = args.connections or ([10, 50] if quick else [10, 50, 100])
    only = set(args.only or ["throughput", "latency", "million", "limiter"])
    check_redis(args.redis_url)
    started = time.monotonic()
    emit("machine", **machine())
    with tempfile.TemporaryDirectory(prefix="ses-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if "throughput" in only:
            for latency_ms in latencies:
                for conns in connections:
                    for line in throughput_case(
                        latency_ms=latency_ms, connections=conns, runs=runs,
                        redis_url=args.redis_url, workdir=workdir, quick=quick,
                    ):  # fmt: skip
                        print(json.dumps(line), flush=True)
        if "latency" in only:
            for latency_ms in latencies:
                note(f"latency case {latency_ms} ms")
                with lean_sandbox(workdir, latency_ms) as sandbox:
                    result = latency_bench.run(
                        sandbox, redis_url=args.redis_url, workdir=workdir, connections=10,
                        count=30 if quick else 100, campaign_size=3000 if quick else 8000,
                    )  # fmt: skip
                emit("latency", latency_ms=latency_ms, bulk_connections=10, **result)
        if "million" in only:
            count = args.million_count or (200_000 if quick else 1_000_000)
            note(f"million case: {count:,} recipients")
            result = million_bench.run(redis_url=args.redis_url, workdir=workdir, count=count)
            emit("million", **result)
        if "limiter" in only:
            note("limiter bench (bench/bench_limiter.py)")
            cmd = [sys.executable, "-m", "bench.bench_limiter", "--redis-url", args.redis_url]
            if quick:
                cmd += ["--count", "1000", "--run-s", "2"]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env_for_subprocess(), check=False
            )
            sys.stdout.write(proc.stdout)
            sys.stdout.flush()
            if proc.returncode != 0:
                note(f"limiter bench failed: {proc.stderr[-2000:]}")
    note(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
