"""Turn the JSON lines of ``bench.run`` into the Markdown tables of docs/benchmarks.md.

python -m bench.run > results.jsonl && python -m bench.report results.jsonl

Two tables, one row per (latency, connections) case: throughput, then CPU per message.
A baseline that did not run (``--baselines``) or was skipped shows as a dash.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from typing import Any

DASH = "-"


def _load(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def _fmt(value: Any, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{scale * float(value):{spec}}{suffix}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    rows = _load(sys.argv[1])
    by_case: dict[tuple[float, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    ratios: dict[tuple[float, int], dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []
    for row in rows:
        if row["bench"] == "throughput":
            if "skipped" in row:
                skipped.append(row)
                continue
            by_case[(row["latency_ms"], row["connections"])][row["impl"]] = row
        elif row["bench"] == "ratios":
            ratios[(row["latency_ms"], row["connections"])] = row

    def impl(case: dict[str, dict[str, Any]], kind: str, key: str) -> Any:
        return case.get(kind, {}).get(key)

    # Throughput.
    print(
        _row(
            [
                "latency", "conns", "ours msg/s (end to end)", "ours send phase", "I/O floor",
                "nodemailer", "bare loop", "recipe", "send phase / floor",
                "send phase / nodemailer", "ours / recipe", "ours / bound",
            ]
        )
    )  # fmt: skip
    print(_row(["---"] * 12))
    for key in sorted(by_case):
        c, r = by_case[key], ratios.get(key, {})
        print(
            _row(
                [
                    f"{key[0]:g} ms",
                    str(key[1]),
                    _fmt(impl(c, "ours", "msgs_per_s"), ".0f"),
                    _fmt(impl(c, "ours", "send_phase_msgs_per_s"), ".0f"),
                    *(
                        _fmt(impl(c, k, "msgs_per_s"), ".0f")
                        for k in ("floor", "nodemailer", "bare", "recipe")
                    ),
                    _fmt(r.get("send_phase_vs_floor"), ".2f"),
                    _fmt(r.get("send_phase_vs_nodemailer"), ".2f", "x"),
                    _fmt(r.get("throughput_vs_recipe"), ".1f", "x"),
                    _fmt(r.get("throughput_vs_bound"), ".0f", "%", scale=100),
                ]
            )
        )

    # CPU per message (ms): worker_cpu_s_per_1000 is ms per message.
    print()
    print(
        _row(
            [
                "latency", "conns", "CPU ms/msg: ours workers", "Redis", "workers + Redis",
                "I/O floor", "nodemailer", "bare loop", "recipe",
                "(workers + Redis) / nodemailer", "workers / floor", "workers / bare",
            ]
        )
    )  # fmt: skip
    print(_row(["---"] * 12))
    for key in sorted(by_case):
        c, r = by_case[key], ratios.get(key, {})
        print(
            _row(
                [
                    f"{key[0]:g} ms",
                    str(key[1]),
                    _fmt(impl(c, "ours", "worker_cpu_s_per_1000"), ".2f"),
                    _fmt(impl(c, "ours", "redis_cpu_ms_per_msg"), ".2f"),
                    _fmt(impl(c, "ours", "worker_plus_redis_cpu_ms_per_msg"), ".2f"),
                    *(
                        _fmt(impl(c, k, "worker_cpu_s_per_1000"), ".2f")
                        for k in ("floor", "nodemailer", "bare", "recipe")
                    ),
                    _fmt(r.get("cpu_vs_nodemailer"), ".2f"),
                    _fmt(r.get("cpu_vs_floor"), ".2f"),
                    _fmt(r.get("cpu_vs_bare"), ".2f"),
                ]
            )
        )
    extra = [
        (key, c["nodemailer-nodelay"]) for key, c in sorted(by_case.items())
        if "nodemailer-nodelay" in c
    ]  # fmt: skip
    if extra:
        print()
        print("nodemailer with TCP_NODELAY (`nodemailer-nodelay`):")
        print()
        print(_row(["latency", "conns", "msg/s", "CPU ms/msg", "send phase / it", "CPU / it"]))
        print(_row(["---"] * 6))
        for key, row in extra:
            r = ratios.get(key, {})
            print(
                _row(
                    [
                        f"{key[0]:g} ms",
                        str(key[1]),
                        _fmt(row.get("msgs_per_s"), ".0f"),
                        _fmt(row.get("worker_cpu_s_per_1000"), ".2f"),
                        _fmt(r.get("send_phase_vs_nodemailer_nodelay"), ".2f", "x"),
                        _fmt(r.get("cpu_vs_nodemailer_nodelay"), ".2f"),
                    ]
                )
            )
    for row in skipped:
        print()
        print(f"{row['impl']} skipped at {row['latency_ms']:g} ms / {row['connections']}: "
              f"{row['skipped']}")  # fmt: skip
    for row in rows:
        if row["bench"] in ("latency", "million", "limiter", "machine"):
            print()
            print("`" + json.dumps(row) + "`")


if __name__ == "__main__":
    main()
