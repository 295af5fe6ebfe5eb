"""Command line of `python -m bench`: parse options, run, print the table, write the files."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from bench import machine, report, runner
from bench.bandwidth import copy_tensor_bytes, measure_copy_bandwidth
from bench.impls import CandidateUnavailable, Impl, candidate_info, check_impls, default_impls
from bench.passes import PASSES
from bench.records import ImplInfo, Results, Row
from bench.shapes import PRESETS, PUBLIC_PRESETS, parse_shapes, preset_shapes
from bench.timing import default_policy, make_timer

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
FORMATS = {"nchw": ["nchw"], "nhwc": ["nhwc"], "both": ["nchw", "nhwc"]}
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The full set on a GPU (a few minutes); on the CPU a handful of shapes, well under 3 minutes.
DEFAULT_PRESET = {"cuda": "all", "cpu": "quick"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m bench`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time bn_cuda.BatchNorm2d against PyTorch's batch norm and the device's copy bandwidth.",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--format", choices=tuple(FORMATS), default="both", help="memory format (nhwc: channels_last)")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        metavar="{" + ",".join(PUBLIC_PRESETS) + "}",
        help="shapes: quick (4), resnet50 (the 12 distinct BatchNorm2d inputs of ResNet-50 at batch 256 "
        "on cuda, 32 on cpu), all "
        "(resnet50 plus 4 edge cases); default: all on cuda, quick on cpu",
    )
    parser.add_argument("--shapes", help="NxCxHxW[,NxCxHxW...] instead of a preset")
    parser.add_argument(
        "--passes",
        nargs="+",
        default=list(PASSES),
        metavar="PASS",
        help=f"subset of {' '.join(PASSES)} (space or comma separated); default: all",
    )
    parser.add_argument("--out", type=Path, help="output directory; default: bench/results/<device-slug>/")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--budget", type=float, help="seconds of timing per row, all implementations together")
    parser.add_argument(
        "--baselines",
        help="comma-separated subset of the device's baselines to time next to bn_cuda "
        "(cuda: torch,torch_native,torch_compile; cpu: torch,torch_compile); default: all. "
        "Leaving torch_compile out saves its compile time per row",
    )
    return parser


def _passes(values: Sequence[str]) -> list[str]:
    chosen = [p for value in values for p in value.split(",") if p]
    unknown = [p for p in chosen if p not in PASSES]
    if unknown or not chosen:
        raise ValueError(f"--passes: unknown {unknown}; choose from {', '.join(PASSES)}")
    return list(dict.fromkeys(chosen))


def _select_baselines(impls: list[Impl], value: str | None) -> list[Impl]:
    """The candidate plus the baselines named in `value` (all of them when None), in their order."""
    if value is None:
        return impls
    wanted = [name for name in value.split(",") if name]
    known = [impl.name for impl in impls if not impl.candidate]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise ValueError(f"--baselines: unknown {unknown}; choose from {', '.join(known)}")
    return [impl for impl in impls if impl.candidate or impl.name in wanted]


def main(argv: Sequence[str] | None = None, impls: Sequence[Impl] | None = None) -> int:
    """Run the benchmark; returns the exit status. `impls` replaces bn_cuda and the default
    baselines (tests use it to run without the extension or to inject a failing baseline)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    previous_threads = torch.get_num_threads()
    try:
        return _run(args, argv, impls)
    except (CandidateUnavailable, ValueError) as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    finally:
        # main() may be called in-process (tests): leave torch's thread count as it was.
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, argv: list[str], impls: Sequence[Impl] | None) -> int:
    started = time.perf_counter()
    clock_start = machine.cpu_clock()
    device = machine.resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    chosen = list(impls) if impls is not None else default_impls(device.type)
    chosen = _select_baselines(chosen, args.baselines)
    check_impls(chosen)
    config = _config(args, device)
    log(f"bench: {machine.device_name(device)} ({device}), dtype {args.dtype}, {threads} CPU threads")

    copy_bytes = copy_tensor_bytes(device, config.cache_bytes)
    copy_start = measure_copy_bandwidth(device, make_timer(device), copy_bytes)
    log(f"bench: copy bandwidth {copy_start.gbps:.1f} GB/s ({copy_bytes / 2**20:.0f} MiB tensor)")
    rows = _measure(config, chosen)
    # Measured again at the end: the limit is what the device can do, so the better of the two
    # counts, and a large gap between them says the machine was disturbed during the run.
    copy_end = measure_copy_bandwidth(device, make_timer(device), copy_bytes)
    copy_gbps = max(copy_start.gbps, copy_end.gbps)

    extra = {
        "copy_bandwidth": {
            "gbps": copy_gbps,
            "start_gbps": copy_start.gbps,
            "end_gbps": copy_end.gbps,
            "tensor_bytes": copy_start.tensor_bytes,
            "samples": copy_start.samples,
        },
        "preset": None if args.shapes else (args.preset or DEFAULT_PRESET[device.type]),
        "timing_policy": dataclasses.asdict(config.policy),
        # Build details only of the real extension, not of a stand-in passed by a caller.
        "bn_cuda_build": candidate_info() if impls is None else {},
        "seconds": round(time.perf_counter() - started, 1),
        "other_cpu_load": machine.other_cpu_load(clock_start, machine.cpu_clock()),
        "cpu_count": os.cpu_count(),
    }
    results = Results(
        metadata=machine.metadata(device, config.dtype, threads, argv, extra),
        copy_gbps=copy_gbps,
        impls=[ImplInfo(impl.name, impl.label, impl.candidate) for impl in chosen],
        rows=rows,
    )
    out_dir = args.out or RESULTS_DIR / machine.device_slug(device, threads)
    _write(results, out_dir)
    log(f"bench: wrote {out_dir} in {time.perf_counter() - started:.0f} s")
    return 0


def _config(args: argparse.Namespace, device: torch.device) -> runner.RunConfig:
    """What the options ask to measure on `device`."""
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = preset_shapes(args.preset or DEFAULT_PRESET[device.type], device.type)
    policy = default_policy(device)
    if args.budget is not None:
        policy = dataclasses.replace(policy, budget_s=args.budget)
    return runner.RunConfig(
        device=device,
        dtype=DTYPES[args.dtype],
        shapes=shapes,
        formats=FORMATS[args.format],
        passes=_passes(args.passes),
        policy=policy,
        cache_bytes=machine.cache_bytes(device),
    )


def _measure(config: runner.RunConfig, impls: Sequence[Impl]) -> list[Row]:
    """Run the benchmark with a progress bar on stderr naming the row being measured."""
    labels = runner.row_labels(config)
    rows: list[Row] = []
    with tqdm(total=len(labels), file=sys.stderr, unit="row", dynamic_ncols=True) as progress:
        progress.set_postfix_str(labels[0] if labels else "")
        for row in runner.run(config, impls):
            rows.append(row)
            if len(rows) < len(labels):
                progress.set_postfix_str(labels[len(rows)], refresh=False)
            progress.update()
    return rows


def _write(results: Results, out_dir: Path) -> None:
    """Print the table and write table.md, results.csv, results.json and speedup.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = report.format_table(results)
    print(table, end="")
    (out_dir / report.TABLE_FILE).write_text(table)
    report.write_csv(results, out_dir / report.CSV_FILE)
    report.write_json(results, out_dir / report.JSON_FILE)
    from bench.plot import PLOT_FILE, plot_speedup  # imported here: matplotlib is slow to import

    plot_speedup(results, out_dir / PLOT_FILE)


def log(message: str) -> None:
    """Status lines go to stderr so that stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)
