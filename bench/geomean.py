"""Geometric-mean speedups of a bench run, per pass and format: the README's summary table.

    python -m bench.geomean bench/results/cpu-amd-epyc-2t/results.csv

"faster baseline" is, per row, the faster of the baselines (the smaller of the speedups); rows
where an implementation failed are left out.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict


def summarize(path: str) -> list[str]:
    groups: dict[tuple[str, str], list[tuple[float, float, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    speedup_columns = [k for k in rows[0] if k.startswith("speedup_vs_")] if rows else []
    for row in rows:
        try:
            speedups = [float(row[k]) for k in speedup_columns]
        except ValueError:
            continue
        eager = float(row["speedup_vs_torch"])
        groups[(row["pass"], row["format"])].append((eager, min(speedups), row["shape"]))
    lines = [
        "| pass | format | geomean vs eager | geomean vs faster baseline | worst vs faster |",
        "|---|---|---:|---:|---:|",
    ]
    for (pass_name, fmt), cells in sorted(groups.items()):

        def geomean(values: list[float]) -> float:
            return math.exp(sum(math.log(v) for v in values) / len(values))

        worst = min(cells, key=lambda c: c[1])
        lines.append(
            f"| {pass_name} | {fmt} | {geomean([c[0] for c in cells]):.2f}x | "
            f"{geomean([c[1] for c in cells]):.2f}x | {worst[1]:.2f}x ({worst[2]}) |"
        )
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.geomean RESULTS.csv")
    print("\n".join(summarize(sys.argv[1])))
