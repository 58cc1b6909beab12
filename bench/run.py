"""Run every benchmark and print one JSON line per result (stdout); progress on stderr.

    python -m bench.run                 # the full run (throughput with floor + nodemailer)
    python -m bench.run --quick         # one run per case, fewer cases
    python -m bench.run --only throughput --latency-ms 20 --conns 10,50,100
    python -m bench.run --only throughput --baselines all    # + bare loop, recipe, nodelay

Starts what it needs: checks Redis, starts the sandbox in its fast mode (no message
bytes kept, no JSONL store or event log) with the per-reply latency of each case, and real
worker processes. Each throughput/CPU case runs ours and the chosen baselines
(``--baselines``, default ``floor,nodemailer``; also ``bare``, ``recipe`` and
``nodemailer-nodelay``) in the same sandbox, interleaved, ``--runs`` times, and reports
medians and ratios.

Per case, the ``ours`` line adds to the end-to-end ``msgs_per_s`` (enqueue included):
``send_phase_msgs_per_s`` (first ``sent`` seen in the campaign status to all final, see
``bench/throughput.py``), ``redis_cpu_ms_per_msg`` (the Redis server's CPU over the run) and
``worker_plus_redis_cpu_ms_per_msg``. The ``nodemailer`` line is
``bench/nodemailer_pool.js`` (2 node processes x N/2 pooled connections; installed with npm
into /tmp at bench time, skipped with a ``skipped`` line when node or npm is missing). The
``ratios`` line adds ``send_phase_vs_floor``, ``send_phase_vs_nodemailer`` and
``cpu_vs_nodemailer`` (ours' worker + Redis CPU per message over nodemailer's CPU per
message). Ratios whose baseline did not run are null.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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
from .nodemailer import Nodemailer, NodemailerUnavailable, ensure_nodemailer, floor_message_bytes
from .throughput import Ours, batch_size_for

#: SES answers MAIL, RCPT, DATA and the end of data one at a time (no PIPELINING).
ROUND_TRIPS_PER_MESSAGE = 4
PROCESSES = 2
#: Throughput baselines, in the order each run executes them (ours runs after the loops and
#: nodemailer, the recipe last).
BASELINES = ("floor", "bare", "nodemailer", "nodemailer-nodelay", "recipe")
DEFAULT_BASELINES = ("floor", "nodemailer")
NODEMAILER_KINDS = ("nodemailer", "nodemailer-nodelay")
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


def _num(value: Any, digits: int) -> float | None:
    """Rounded for the JSON line; None for a missing or NaN value (NaN is not JSON)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, digits)


def _medians(rs: list[dict[str, Any]]) -> dict[str, float]:
    """Median of every numeric key over the runs, NaN (unavailable) readings left out."""
    out: dict[str, float] = {}
    for key, value in rs[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [float(r[key]) for r in rs if r.get(key) is not None]
        values = [v for v in values if not math.isnan(v)]
        out[key] = median(values)
    return out


def throughput_case(
    *, latency_ms: float, connections: int, runs: int, redis_url: str, workdir: Path,
    quick: bool, baselines: Sequence[str] = DEFAULT_BASELINES,
) -> list[dict[str, Any]]:  # fmt: skip
    count, recipe_count = counts_for(latency_ms, connections, quick)
    note(f"case latency={latency_ms} ms connections={connections}: {count} messages"
         + (f", recipe {recipe_count}" if "recipe" in baselines else "")
         + f"; baselines {','.join(baselines)}")  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {"ours": []}
    results.update({kind: [] for kind in BASELINES if kind in baselines})
    skipped: dict[str, str] = {}
    for kind in NODEMAILER_KINDS:
        if kind in results:
            try:
                ensure_nodemailer()
            except NodemailerUnavailable as exc:
                note(f"{kind} skipped: {exc}")
                skipped[kind] = str(exc)
                del results[kind]
    with lean_sandbox(workdir, latency_ms) as sandbox:
        ours = Ours(
            sandbox, redis_url=redis_url, workdir=workdir, connections=connections,
            processes=PROCESSES,
        ).start()  # fmt: skip
        recipe: Recipe | None = None
        nodemailers: dict[str, Nodemailer] = {}
        try:
            for kind in NODEMAILER_KINDS:
                if kind in results:
                    nodemailers[kind] = Nodemailer(
                        sandbox, connections=connections, processes=PROCESSES,
                        workdir=workdir, nodelay=kind.endswith("nodelay"),
                    ).start()  # fmt: skip
            if "recipe" in results:
                recipe = Recipe(
                    sandbox, redis_url=redis_url, workdir=workdir, connections=connections,
                    processes=PROCESSES,
                ).start()  # fmt: skip
            for run in range(runs):
                for kind in ("floor", "bare"):
                    if kind in results:
                        results[kind].append(
                            run_loop(
                                kind, sandbox, connections=connections, processes=PROCESSES,
                                count=count,
                            )
                        )  # fmt: skip
                for kind, nodemailer in nodemailers.items():
                    results[kind].append(nodemailer.run(count))
                results["ours"].append(ours.run(count))
                if recipe is not None:
                    results["recipe"].append(recipe.run(recipe_count))
                note(
                    f"  run {run + 1}/{runs}: "
                    + ", ".join(f"{k} {v[-1]['msgs_per_s']:.0f}/s" for k, v in results.items())
                    + f" (ours send phase {results['ours'][-1]['send_phase_msgs_per_s']:.0f}/s)"
                )
        except BaseException:
            note(f"case failed; sandbox {sandbox.state()}; its log: {sandbox.log_tail()}")
            raise
        finally:
            if recipe is not None:
                recipe.stop()
            for nodemailer in nodemailers.values():
                nodemailer.stop()
            ours.stop()
    med = {kind: _medians(rs) for kind, rs in results.items()}
    case = {"latency_ms": latency_ms, "connections": connections}
    out: list[dict[str, Any]] = []
    for kind, m in med.items():
        row: dict[str, Any] = {
            "bench": "throughput",
            "impl": kind,
            **case,
            "processes": PROCESSES,
            "runs": runs,
            "messages": recipe_count if kind == "recipe" else count,
            "msgs_per_s": _num(m["msgs_per_s"], 1),
            "worker_cpu_s_per_1000": _num(m["cpu_s_per_1000"], 3),
            "sandbox_cpu_s_per_1000": _num(m["sandbox_cpu_s_per_1000"], 3),
            "all_msgs_per_s": [_num(r["msgs_per_s"], 1) for r in results[kind]],
        }
        if kind == "ours":
            row.update(
                send_phase_msgs_per_s=_num(m["send_phase_msgs_per_s"], 1),
                send_phase_s=_num(m["send_phase_s"], 3),
                enqueue_s=_num(m["enqueue_s"], 3),
                redis_cpu_ms_per_msg=_num(m["redis_cpu_s_per_1000"], 3),
                worker_plus_redis_cpu_ms_per_msg=_num(m["worker_plus_redis_cpu_s_per_1000"], 3),
                redis_cpu_ms_per_msg_proc_stat=_num(m["redis_cpu_proc_s_per_1000"], 3),
                redis_idle_cpu_ms_per_s=_num(m["redis_idle_cpu_ms_per_s"], 2),
                all_send_phase_msgs_per_s=[
                    _num(r["send_phase_msgs_per_s"], 1) for r in results[kind]
                ],
            )
        elif kind in NODEMAILER_KINDS:
            last = results[kind][-1]
            row.update(
                layout=f"{PROCESSES} node processes x {max(1, connections // PROCESSES)} "
                "pooled connections",
                message_bytes=last["message_bytes"],
                floor_message_bytes=floor_message_bytes(),
                connections_open=last["connections_open"],
                errors=sum(int(r["errors"]) for r in results[kind]),
                nodemailer_version=last["nodemailer_version"],
            )
        out.append(row)
    for kind, reason in skipped.items():
        out.append({"bench": "throughput", "impl": kind, **case, "skipped": reason})

    def get(kind: str, key: str) -> float | None:
        return med[kind].get(key) if kind in med else None

    ours_m = med["ours"]
    latency_bound = (
        connections / (ROUND_TRIPS_PER_MESSAGE * latency_ms / 1000) if latency_ms > 0 else None
    )
    capacity = get("floor", "msgs_per_s")
    bounds = [b for b in (latency_bound, capacity) if b is not None]
    bound = min(bounds) if bounds else None
    ours_cpu = ours_m["cpu_s_per_1000"]
    ours_total_cpu = ours_m["worker_plus_redis_cpu_s_per_1000"]
    ours_send = ours_m["send_phase_msgs_per_s"]
    ratios: dict[str, Any] = {
        "bench": "ratios",
        **case,
        "throughput_vs_recipe": _ratio(ours_m["msgs_per_s"], get("recipe", "msgs_per_s"), 2),
        "throughput_vs_bound": _ratio(ours_m["msgs_per_s"], bound),
        "bound_msgs_per_s": _num(bound, 1),
        "latency_bound_msgs_per_s": _num(latency_bound, 1),
        "floor_msgs_per_s": _num(capacity, 1),
        "send_phase_msgs_per_s": _num(ours_send, 1),
        "send_phase_vs_floor": _ratio(ours_send, capacity),
        "send_phase_vs_nodemailer": _ratio(ours_send, get("nodemailer", "msgs_per_s")),
        "cpu_vs_bare": _ratio(ours_cpu, get("bare", "cpu_s_per_1000")),
        "cpu_vs_floor": _ratio(ours_cpu, get("floor", "cpu_s_per_1000")),
        "cpu_vs_recipe": _ratio(ours_cpu, get("recipe", "cpu_s_per_1000")),
        "cpu_vs_nodemailer": _ratio(ours_total_cpu, get("nodemailer", "cpu_s_per_1000")),
    }
    if "nodemailer-nodelay" in med:
        ratios["send_phase_vs_nodemailer_nodelay"] = _ratio(
            ours_send, get("nodemailer-nodelay", "msgs_per_s")
        )
        ratios["cpu_vs_nodemailer_nodelay"] = _ratio(
            ours_total_cpu, get("nodemailer-nodelay", "cpu_s_per_1000")
        )
    out.append(ratios)
    return out


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _baselines(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    if kinds == ["all"]:
        return list(BASELINES)
    unknown = sorted(set(kinds) - set(BASELINES))
    if unknown:
        choices = ", ".join(BASELINES)
        message = f"unknown baseline(s) {', '.join(unknown)}; choose from {choices} or 'all'"
        raise argparse.ArgumentTypeError(message)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument(
        "--latency", "--latency-ms", dest="latency", type=_floats, action="extend",
        help="per-reply latency in ms; comma-separated and/or repeatable (default 0,20)",
    )  # fmt: skip
    parser.add_argument(
        "--connections", "--conns", dest="connections", type=_ints, action="extend",
        help="comma-separated and/or repeatable (default 10,50,100; 10,50 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--baselines", type=_baselines, default=list(DEFAULT_BASELINES),
        help=f"throughput baselines run next to ours, comma-separated from "
        f"{','.join(BASELINES)} or 'all' (default {','.join(DEFAULT_BASELINES)})",
    )  # fmt: skip
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
                        baselines=args.baselines,
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
