"""The memory-traffic limit: minimal bytes per pass and the device's measured copy bandwidth.

Batch norm is memory-bound, so the yardstick is how long the device needs to move the bytes a
pass cannot avoid: with B the bytes of x, a forward reads x and writes y (2B), a backward reads x
and dy and writes dx (3B). "% of limit" is that time at the measured copy bandwidth over the
measured time. A forward that reads x twice (statistics, then normalization: 3B) can reach at most
2/3 (~67%) of the limit; a backward that reads x and dy twice (5B) at most 3/5 (60%).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only an annotation here; a runtime import would be circular (records -> bandwidth)
    from bench.timing import Timer

# Minimal traffic of each pass in multiples of the bytes of x (per-channel vectors are negligible).
MIN_TRAFFIC_FACTOR = {"fwd-train": 2, "bwd": 3, "fwd+bwd": 5, "fwd-eval": 2}

LIMIT_NOTE = (
    "% of limit = (minimal bytes / copy bandwidth) / time, with B the bytes of x: fwd-train and "
    "fwd-eval move at least 2B (read x, write y), bwd 3B (read x and dy, write dx), fwd+bwd 5B. "
    "A forward that reads x twice (statistics, then normalization: 3B) can reach at most ~67% of "
    "this limit; a backward that reads x and dy twice (5B) at most 60%."
)


def min_bytes(numel: int, itemsize: int, pass_name: str) -> int:
    """Bytes a pass must move at least for an input of `numel` elements of `itemsize` bytes."""
    return MIN_TRAFFIC_FACTOR[pass_name] * numel * itemsize


def gbps(nbytes: int, seconds: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


def pct_of_limit(nbytes: int, seconds: float, copy_gbps: float) -> float:
    """Percent of the copy-bandwidth limit: the time `nbytes` take at copy bandwidth over `seconds`."""
    return 100.0 * (nbytes / (copy_gbps * 1e9)) / seconds


@dataclass(frozen=True)
class CopyBandwidth:
    """Median bandwidth of copying a tensor of `tensor_bytes` (counting its read and its write)."""

    gbps: float
    tensor_bytes: int
    samples: int


def copy_tensor_bytes(device: torch.device, cache_bytes: int) -> int:
    """A copy size far beyond the last-level cache, so the copy streams from memory."""
    floor = 1 << 30 if device.type == "cuda" else 256 << 20
    return max(floor, 8 * cache_bytes)


def measure_copy_bandwidth(device: torch.device, timer: Timer, tensor_bytes: int, samples: int = 15) -> CopyBandwidth:
    """Time dst.copy_(src) for float32 tensors of `tensor_bytes`; bytes moved = 2 * tensor_bytes."""
    numel = tensor_bytes // 4
    # Filled, not empty: on the CPU untouched pages would fault during the first copies.
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)

    def run(calls: int) -> None:
        for _ in range(calls):
            dst.copy_(src)

    run(3)
    per_call = [timer.measure(run, 1).device_s for _ in range(samples)]
    moved = 2 * numel * 4
    return CopyBandwidth(gbps(moved, statistics.median(per_call)), numel * 4, samples)
