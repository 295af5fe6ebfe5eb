"""Time bn_cuda.SyncBatchNorm's training step (forward + backward) against plain batch norm.

    python examples/bench_sync_batchnorm.py                  # 2 ranks, gloo on 127.0.0.1, CPU
    python examples/bench_sync_batchnorm.py --world 2 --repeats 30

For each global batch shape, with W ranks of one thread each holding N / W samples:

- ``sync``: bn_cuda.SyncBatchNorm on each rank (statistics over all ranks: one all-gather in
  forward, one all-reduce in backward);
- ``local``: bn_cuda.BatchNorm2d on each rank's own samples, no communication: sync - local is
  the cost of synchronizing;
- ``nn`` and ``bn_cuda``: torch.nn.BatchNorm2d and bn_cuda.BatchNorm2d in one process on the
  whole global batch, the result SyncBatchNorm reproduces: the faster of 1 and W threads (W
  threads use the same cores as the ranks, but on a busy machine OpenMP's parallel regions can
  be far slower than one thread).

Times are medians over ``--repeats`` steps after warm-up; a distributed step is timed on every
rank after a barrier and the slowest rank's median is reported. Results go to
bench/results/<cpu-slug>/sync_batchnorm.csv and .md. Other work on the machine distorts CPU
timings: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
# bench/ (for the machine's results directory name) is not an installed package, and bn_cuda
# may be built in place: both are found from the repository root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import bn_cuda  # noqa: E402
from bench.machine import cpu_name, device_slug  # noqa: E402
from bn_cuda.sync_batchnorm import SyncBatchNorm  # noqa: E402

# Global (N, C, H, W) batches: a large feature map, a deep narrow one, and BatchNorm1d-like
# (spatial size 1), where communication weighs most.
SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (256, 1024, 1, 1)]
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
WARMUP = 3


def step_times(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, repeats: int, barrier: bool) -> list[float]:
    """Seconds of each of ``repeats`` forward + backward steps, after WARMUP untimed ones."""
    times = []
    for i in range(WARMUP + repeats):
        if barrier:
            dist.barrier()  # ranks start each step together, so nobody times a peer's lateness
        start = time.perf_counter()
        module(x).backward(dy)
        elapsed = time.perf_counter() - start
        x.grad = None
        if i >= WARMUP:
            times.append(elapsed)
    return times


def make_input(shape: tuple[int, ...], memory_format: torch.memory_format, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
    return x.requires_grad_(), dy


def rank_main(rank: int, world: int, port: int, repeats: int, out_path: str) -> None:
    """One rank: time ``sync`` and ``local`` for every case; rank 0 writes the slowest medians."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    medians: dict[str, float] = {}
    for shape in SHAPES:
        local_shape = (shape[0] // world, *shape[1:])
        for fmt_name, fmt in MEMORY_FORMATS.items():
            x, dy = make_input(local_shape, fmt, seed=rank)
            for impl, module in (("sync", SyncBatchNorm(shape[1])), ("local", bn_cuda.BatchNorm2d(shape[1]))):
                mine = torch.tensor(statistics.median(step_times(module, x, dy, repeats, barrier=True)))
                everyone = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(everyone, mine)
                medians[f"{shape}|{fmt_name}|{impl}"] = max(t.item() for t in everyone)
    if rank == 0:
        Path(out_path).write_text(json.dumps(medians))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--world", type=int, default=2, help="number of ranks (one thread each)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: bench/results/<cpu>)")
    args = parser.parse_args()
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only

    # Single-process baselines on the global batch: the faster of 1 thread and one per rank.
    medians: dict[str, float] = {}
    for threads in sorted({1, args.world}):
        torch.set_num_threads(threads)
        for shape in SHAPES:
            for fmt_name, fmt in MEMORY_FORMATS.items():
                x, dy = make_input(shape, fmt, seed=0)
                for impl, module in (("nn", nn.BatchNorm2d(shape[1])), ("bn_cuda", bn_cuda.BatchNorm2d(shape[1]))):
                    key = f"{shape}|{fmt_name}|{impl}"
                    median = statistics.median(step_times(module, x, dy, args.repeats, barrier=False))
                    medians[key] = min(median, medians.get(key, median))
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "medians.json")
        mp.spawn(rank_main, args=(args.world, free_port(), args.repeats, out_path), nprocs=args.world)
        medians.update(json.loads(Path(out_path).read_text()))

    out_dir = args.out or REPO_ROOT / "bench" / "results" / device_slug(torch.device("cpu"), args.world)
    out_dir.mkdir(parents=True, exist_ok=True)
    impls = ["sync", "local", "nn", "bn_cuda"]
    rows = []
    for shape in SHAPES:
        for fmt_name in MEMORY_FORMATS:
            ms = {impl: medians[f"{shape}|{fmt_name}|{impl}"] * 1e3 for impl in impls}
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "memory_format": fmt_name,
                    "dtype": "float32",
                    "world": args.world,
                    **{f"{impl}_ms": round(ms[impl], 4) for impl in impls},
                    "sync_overhead_ms": round(ms["sync"] - ms["local"], 4),
                    "sync_vs_nn": round(ms["nn"] / ms["sync"], 3),
                }
            )
    with open(out_dir / "sync_batchnorm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (
        f"# bn_cuda.SyncBatchNorm training step (forward + backward), CPU\n\n"
        f"{cpu_name()}; torch {torch.__version__}; Python {platform.python_version()}; gloo over 127.0.0.1; "
        f"{args.world} ranks x 1 thread vs 1 process (best of 1 and {args.world} threads); float32; median of "
        f"{args.repeats} steps; load average at the end {load}.\n\n"
        "sync: SyncBatchNorm, N / W samples per rank. local: bn_cuda.BatchNorm2d on the same N / W "
        "samples without communication. nn, bn_cuda: one process on the global batch. "
        "sync vs nn > 1 means the distributed step is faster.\n\n"
    )
    table = ["| global N x C x H x W | format | sync ms | local ms | overhead ms | nn ms | bn_cuda ms | sync vs nn |"]
    table.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        table.append(
            f"| {r['shape']} | {r['memory_format']} | {r['sync_ms']:.3f} | {r['local_ms']:.3f} | "
            f"{r['sync_overhead_ms']:.3f} | {r['nn_ms']:.3f} | {r['bn_cuda_ms']:.3f} | {r['sync_vs_nn']:.2f}x |"
        )
    (out_dir / "sync_batchnorm.md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))
    print(f"\nwritten to {out_dir}/sync_batchnorm.csv and .md")


if __name__ == "__main__":
    main()
