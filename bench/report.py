"""Turn the JSON lines of ``bench.run`` into the Markdown tables of docs/benchmarks.md.

python -m bench.run > results.jsonl && python -m bench.report results.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any


def _load(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def main() -> None:
    rows = _load(sys.argv[1])
    by_case: dict[tuple[float, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    ratios: dict[tuple[float, int], dict[str, Any]] = {}
    for row in rows:
        if row["bench"] == "throughput":
            by_case[(row["latency_ms"], row["connections"])][row["impl"]] = row
        elif row["bench"] == "ratios":
            ratios[(row["latency_ms"], row["connections"])] = row
    print(
        "| latency | conns | ours msg/s | recipe | bare loop | I/O floor | ours/recipe "
        "| ours/bound | CPU ms/msg ours | bare | floor | recipe | ours/bare | ours/floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(by_case):
        c, r = by_case[key], ratios.get(key, {})
        print(
            f"| {key[0]:g} ms | {key[1]} "
            + "".join(f"| {c[k]['msgs_per_s']:.0f} " for k in ("ours", "recipe", "bare", "floor"))
            + f"| {r.get('throughput_vs_recipe', float('nan')):.1f}x "
            + f"| {100 * r.get('throughput_vs_bound', float('nan')):.0f}% "
            + "".join(
                f"| {c[k]['worker_cpu_s_per_1000']:.2f} "
                for k in ("ours", "bare", "floor", "recipe")
            )
            + f"| {r.get('cpu_vs_bare', float('nan')):.2f} "
            + f"| {r.get('cpu_vs_floor', float('nan')):.2f} |"
        )
    for row in rows:
        if row["bench"] in ("latency", "million", "limiter", "machine"):
            print()
            print("`" + json.dumps(row) + "`")


if __name__ == "__main__":
    main()
