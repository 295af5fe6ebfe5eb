"""speedup.png: the candidate's speedup over each baseline, per shape and pass, one panel per
(baseline, memory format)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

# Files only: no display on build machines and CI; chosen before pyplot is imported.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from bench.records import Results

PLOT_FILE = "speedup.png"


def plot_speedup(results: Results, path: Path) -> None:
    """Grouped bars: x = shape, one bar per pass, y = speedup on a log2 axis from a line at 1x.
    Rows where either side failed have no bar."""
    formats = list(dict.fromkeys(row.memory_format for row in results.rows))
    pass_names = list(dict.fromkeys(row.pass_name for row in results.rows))
    shapes = list(dict.fromkeys(str(row.shape) for row in results.rows))
    baselines = results.baselines
    width = 0.8 / max(len(pass_names), 1)
    fig, axes = plt.subplots(
        len(baselines),
        len(formats),
        figsize=(max(6.0, 0.55 * len(shapes) * len(formats) + 2), 3.2 * len(baselines) + 1),
        squeeze=False,
        sharey=True,
    )
    index = {(str(r.shape), r.memory_format, r.pass_name): r for r in results.rows}
    for i, baseline in enumerate(baselines):
        for j, memory_format in enumerate(formats):
            ax = axes[i][j]
            for k, pass_name in enumerate(pass_names):
                xs, ys = [], []
                for s, shape in enumerate(shapes):
                    row = index.get((shape, memory_format, pass_name))
                    speedup = row.speedup(results.candidate, baseline.name) if row else None
                    if speedup is not None:
                        xs.append(s + (k - (len(pass_names) - 1) / 2) * width)
                        ys.append(speedup)
                # Bars grow from 1x, up for a speedup and down for a slowdown.
                ax.bar(xs, [y - 1.0 for y in ys], bottom=1.0, width=width, label=pass_name)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"vs {baseline.label}, {memory_format}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].set_ylabel(f"{results.candidate} speedup")
    axes[0][-1].legend(fontsize=7, loc="best")
    meta = results.metadata
    fig.suptitle(f"{results.candidate} speedup, {meta['device_name']}, {meta['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
