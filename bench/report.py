"""Writes a run's results: the markdown table (stdout and table.md), results.csv and results.json."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.bandwidth import LIMIT_NOTE
from bench.records import NOISY_SPREAD, Results, Row
from bench.runner import MAX_ROTATION

TABLE_FILE = "table.md"
CSV_FILE = "results.csv"
JSON_FILE = "results.json"

HOST_BOUND_MARK = "†"
MISMATCH_MARK = "!"
NOISY_MARK = "~"

PASS_NOTE = (
    "Passes: fwd-train = forward in train mode (running stats updated, x requires grad as inside a "
    "network); bwd = backward alone (torch.autograd.grad on a retained graph); fwd+bwd = both; "
    "fwd-eval = eval-mode forward under no_grad."
)


def _format_us(seconds: float) -> str:
    """Microseconds with about four significant digits."""
    us = seconds * 1e6
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:.0f}"


def _time_text(row: Row, name: str) -> str:
    """A cell's time with its markers, or why it has none."""
    cell = row.cells[name]
    if not cell.ok:
        return f"failed ({cell.error})"
    marks = "".join(
        mark
        for mark, flagged in (
            (NOISY_MARK, cell.noisy),
            (HOST_BOUND_MARK, cell.host_bound),
            (MISMATCH_MARK, cell.mismatch),
        )
        if flagged
    )
    return _format_us(cell.median_s or 0.0) + (f" {marks}" if marks else "")


def _format_number(value: float | None) -> str:
    """GB/s or percent: one decimal below 10, none above."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _header(results: Results) -> list[str]:
    meta = results.metadata
    cuda = f"CUDA {meta['cuda_version']}" if meta.get("cuda_version") else "no CUDA"
    if meta.get("cudnn_version"):
        cuda += f", cuDNN {meta['cudnn_version']}"
    copy = meta.get("copy_bandwidth", {})
    return [
        f"## bn_cuda vs PyTorch batch norm: {meta['device_name']}",
        "",
        f"- device: {meta['device_name']} ({meta['device']}), {meta['threads']} CPU threads; dtype {meta['dtype']}",
        f"- torch {meta['torch_version']} ({cuda}); bn_cuda commit {meta['bn_cuda_commit']}; {meta['date']}",
        f"- copy bandwidth (the limit): {results.copy_gbps:.1f} GB/s, median copy of a "
        f"{copy.get('tensor_bytes', 0) / 2**20:.0f} MiB tensor counting read + write, the better of "
        f"{copy.get('start_gbps', 0):.1f} at the start and {copy.get('end_gbps', 0):.1f} at the end of the run",
        f"- command: `{meta['command']}`",
        "",
    ]


def format_table(results: Results) -> str:
    """The markdown report: header, one row per (shape, format, pass), then the notes."""
    candidate = results.candidate
    labels = {impl.name: impl.label for impl in results.impls}
    heads = [
        "shape",
        "format",
        "pass",
        f"{labels[candidate]} µs",
        *(f"{b.label} µs (speedup)" for b in results.baselines),
        f"{labels[candidate]} GB/s",
        f"{labels[candidate]} % of limit",
    ]
    lines = _header(results)
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "---|" * 3 + "---:|" * (len(heads) - 3))
    for row in results.rows:
        cells = [str(row.shape), row.memory_format, row.pass_name, _time_text(row, candidate)]
        for baseline in results.baselines:
            text = _time_text(row, baseline.name)
            speedup = row.speedup(candidate, baseline.name)
            cells.append(text if speedup is None else f"{text} ({speedup:.2f}x)")
        cells.append(_format_number(row.gbps(candidate)))
        cells.append(_format_number(row.pct_of_limit(candidate, results.copy_gbps)))
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend(_peak_memory_table(results))
    lines.append("")
    lines.extend(f"- {note}" for note in _notes(results))
    return "\n".join(lines) + "\n"


def _peak_memory_table(results: Results) -> list[str]:
    """Peak memory one call allocates, per implementation (CUDA runs only)."""
    if not any(cell.peak_mem_bytes is not None for row in results.rows for cell in row.cells.values()):
        return []
    lines = ["", "Peak memory allocated by one call (MiB, torch.cuda.max_memory_allocated delta):", ""]
    lines.append("| shape | format | pass | " + " | ".join(impl.label for impl in results.impls) + " |")
    lines.append("|" + "---|" * 3 + "---:|" * len(results.impls))
    for row in results.rows:
        cells = [str(row.shape), row.memory_format, row.pass_name]
        for impl in results.impls:
            peak = row.cells[impl.name].peak_mem_bytes
            cells.append("-" if peak is None else f"{peak / 2**20:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(results: Results) -> list[str]:
    meta = results.metadata
    cache = "GPU L2" if meta["device"].startswith("cuda") else "last-level cache"
    notes = [
        f"Times: median µs per call after warm-up; the implementations are sampled in turn in every "
        f"repetition; inputs rotate through distinct tensors totalling at least twice the {cache} "
        f"({meta['cache_bytes'] / 2**20:.0f} MiB; at most {MAX_ROTATION} tensors for tiny shapes). "
        f"Speedup = baseline time / {results.candidate} time (above 1: {results.candidate} is faster).",
        LIMIT_NOTE,
        PASS_NOTE,
    ]
    cells = [cell for row in results.rows for cell in row.cells.values()]
    if any(cell.noisy for cell in cells):
        notes.append(
            f"{NOISY_MARK}: noisy, the samples' interquartile range exceeds {NOISY_SPREAD:.0%} of the median "
            "(q1_us and q3_us in results.csv)."
        )
    if any(cell.host_bound for cell in cells):
        notes.append(
            f"{HOST_BOUND_MARK}: launch-bound, the host needed at least 90% of this time to issue the "
            "calls, so it measures launch overhead rather than the kernels."
        )
    if any(cell.mismatch for cell in cells):
        notes.append(
            f"{MISMATCH_MARK}: the result differs from a float64 reference beyond the dtype's tolerance "
            "(max_err in results.json)."
        )
    if any((row.pct_of_limit(results.candidate, results.copy_gbps) or 0) > 100 for row in results.rows):
        notes.append(
            "Above 100% of the limit: part of the traffic was served from cache, or the copy bandwidth "
            "was measured while the machine was busier than during that row."
        )
    if any(not cell.ok for cell in cells):
        notes.append("failed (X): the implementation raised X on that row; the message is in results.json.")
    if not meta["device"].startswith("cuda"):
        cache_mb = os.environ.get("BN_CUDA_CPU_CACHE_MB", "")
        stream_mb = os.environ.get("BN_CUDA_CPU_STREAM_MB", "")
        notes.append(
            "CPU: every call allocates its outputs, as eager code does; the first touch of each page of "
            "fresh memory costs a page fault. bn_cuda's outputs of 1 MiB and more come from its cache of "
            "freed blocks (BN_CUDA_CPU_CACHE_MB="
            + (cache_mb if cache_mb else "1024, the default")
            + "; 0 turns it off), so from the second call on they reuse memory already mapped, and fresh "
            "blocks of 8 MiB and more get transparent huge pages (BN_CUDA_CPU_HUGE_PAGES=0 turns that off). "
            "PyTorch's large "
            "CPU tensors come fresh from the system on every call, with huge pages only under "
            "THP_MEM_ALLOC_ENABLE=1"
            + (" (set in this run)." if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else " (not set in this run).")
            + (
                " bn_cuda writes outputs of BN_CUDA_CPU_STREAM_MB=" + stream_mb + " MiB and more"
                if stream_mb
                else " bn_cuda writes y of 32 MiB and more and dx of 8 MiB and more (the defaults)"
            )
            + " with non-temporal stores, which skip reading each output line into the cache first (a y "
            "that large has left the cache before a next layer would read it; dx feeds the backward of "
            "the layer before, in a CNN a convolution's, which computes far longer than it reads)."
        )
    if not meta["device"].startswith("cuda"):
        notes.extend(_load_note(meta))
    notes.extend(results.notes)
    return notes


def _load_note(meta: dict[str, Any]) -> list[str]:
    """A warning when other processes competed for the cores during a CPU run."""
    other, cpus = meta.get("other_cpu_load"), meta.get("cpu_count") or 1
    if other is None or other < 0.25 * cpus:
        return []
    return [
        f"The machine was busy: other processes kept {other:.1f} of its {cpus} CPUs busy on average "
        "during the run, so these times are noisy."
    ]


def _finite(value: float | None) -> float | None:
    """JSON and CSV have no infinity: a non-finite value becomes empty."""
    return value if value is not None and math.isfinite(value) else None


def _round(value: float | None, digits: int = 4) -> float | None:
    """Round to `digits` significant digits: more would be noise, and diffs of committed files churn."""
    if value is None or not math.isfinite(value) or value == 0:
        return _finite(value)
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else _round(seconds * 1e6)


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else _round(nbytes / 2**20)


def csv_rows(results: Results) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and one flat dict per row: per implementation its status, time (µs, median and
    quartiles), bandwidth, % of limit, host time, peak memory and error, then the candidate's
    speedup over each baseline."""
    names = [impl.name for impl in results.impls]
    columns = ["shape", "n", "c", "h", "w", "origin", "format", "pass", "dtype", "min_bytes", "rotation"]
    for name in names:
        columns += [f"{name}_{key}" for key in ("status", "us", "q1_us", "q3_us", "gbps", "pct_of_limit")]
        columns += [f"{name}_{key}" for key in ("host_us", "peak_mib", "max_err")]
    columns += [f"speedup_vs_{b.name}" for b in results.baselines]
    out = []
    for row in results.rows:
        flat: dict[str, Any] = {
            "shape": str(row.shape),
            "n": row.shape.n,
            "c": row.shape.c,
            "h": row.shape.h,
            "w": row.shape.w,
            "origin": row.shape.origin,
            "format": row.memory_format,
            "pass": row.pass_name,
            "dtype": row.dtype,
            "min_bytes": row.min_bytes,
            "rotation": row.rotation,
        }
        for name in names:
            cell = row.cells[name]
            flat[f"{name}_status"] = "ok" if cell.ok else f"failed: {cell.error}"
            flat[f"{name}_us"] = _us(cell.median_s)
            flat[f"{name}_q1_us"] = _us(cell.q1_s)
            flat[f"{name}_q3_us"] = _us(cell.q3_s)
            flat[f"{name}_gbps"] = _round(row.gbps(name))
            flat[f"{name}_pct_of_limit"] = _round(row.pct_of_limit(name, results.copy_gbps))
            flat[f"{name}_host_us"] = _us(cell.host_s)
            flat[f"{name}_peak_mib"] = _mib(cell.peak_mem_bytes)
            flat[f"{name}_max_err"] = _round(cell.max_err, 2)
        for baseline in results.baselines:
            flat[f"speedup_vs_{baseline.name}"] = _round(row.speedup(results.candidate, baseline.name))
        out.append(flat)
    return columns, out


def write_csv(results: Results, path: Path) -> None:
    """results.csv: one line per row, empty fields where a value does not exist."""
    columns, rows = csv_rows(results)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def _cell_json(row: Row, name: str, copy_gbps: float) -> dict[str, Any]:
    cell = row.cells[name]
    return {
        "status": cell.status,
        "error": cell.error,
        "error_detail": cell.error_detail,
        "median_us": _us(cell.median_s),
        "q1_us": _us(cell.q1_s),
        "q3_us": _us(cell.q3_s),
        "host_us": _us(cell.host_s),
        "host_bound": cell.host_bound,
        "noisy": cell.noisy,
        "reps": cell.reps,
        "calls_per_sample": cell.calls_per_sample,
        "gbps": _round(row.gbps(name)),
        "pct_of_limit": _round(row.pct_of_limit(name, copy_gbps)),
        "peak_mib": _mib(cell.peak_mem_bytes),
        "max_err": _round(cell.max_err, 2),
        "mismatch": cell.mismatch,
    }


def to_json(results: Results) -> dict[str, Any]:
    """The run as JSON-ready data: metadata, implementations, notes, and every row's cells and
    derived values (speedups, GB/s, % of limit)."""
    rows = [
        {
            "shape": str(row.shape),
            "dims": list(row.shape.dims),
            "origin": row.shape.origin,
            "format": row.memory_format,
            "pass": row.pass_name,
            "dtype": row.dtype,
            "min_bytes": row.min_bytes,
            "rotation": row.rotation,
            "cells": {name: _cell_json(row, name, results.copy_gbps) for name in row.cells},
            "speedup": {b.name: _round(row.speedup(results.candidate, b.name)) for b in results.baselines},
        }
        for row in results.rows
    ]
    return {
        "metadata": results.metadata,
        "copy_gbps": _round(results.copy_gbps),
        "candidate": results.candidate,
        "impls": [asdict(impl) for impl in results.impls],
        "notes": _notes(results),
        "rows": rows,
    }


def write_json(results: Results, path: Path) -> None:
    """results.json: see to_json."""
    path.write_text(json.dumps(to_json(results), indent=1, allow_nan=False) + "\n")
