"""The machine a run measures: device choice, names, cache size, and the run's metadata."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Used when the last-level cache size cannot be read: large enough that rotating inputs over
# twice this size is safe on current server CPUs and GPUs alike.
FALLBACK_CACHE_BYTES = 64 << 20


def resolve_device(choice: str) -> torch.device:
    """The device for --device: "auto" is CUDA when a GPU is present, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available to torch")
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {choice!r}")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """Human-readable device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slugify(text: str) -> str:
    """Lower-case, runs of anything but letters and digits become one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device, threads: int) -> str:
    """Directory name for a device's results, e.g. "nvidia-h100-80gb-hbm3" or "cpu-amd-epyc-2t"."""
    if device.type == "cuda":
        return slugify(device_name(device))
    name = slugify(device_name(device))
    # Some CPUs' model names carry no vendor word the reader would recognise as a CPU.
    prefix = "" if name.startswith("cpu-") else "cpu-"
    return f"{prefix}{name}-{threads}t"


def _cpu_last_level_cache() -> int | None:
    """Size in bytes of the highest cache level listed in sysfs for CPU 0 (Linux only)."""
    best_level, best_size = 0, None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size_text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", size_text)
        if match and level > best_level:
            scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]
            best_level, best_size = level, int(match.group(1)) * scale
    return best_size


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a measurement must not run out of: L2 on a GPU, the LLC on the CPU."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    else:
        size = _cpu_last_level_cache() or 0
    return size or FALLBACK_CACHE_BYTES


@dataclass(frozen=True)
class CpuClock:
    """Machine-wide busy CPU seconds, this process's CPU seconds, and the wall clock, at one moment."""

    busy_s: float
    own_s: float
    wall_s: float


def cpu_clock() -> CpuClock | None:
    """Read the clocks (Linux /proc/stat; None elsewhere)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    # counted in user and nice.
    busy = sum(values[:8]) - values[3] - values[4]
    return CpuClock(busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic())


def other_cpu_load(start: CpuClock | None, end: CpuClock | None) -> float | None:
    """How many CPUs other processes kept busy on average between two readings: work that
    competed with the benchmark for the cores (Inductor's compile workers count here too)."""
    if start is None or end is None or end.wall_s <= start.wall_s:
        return None
    other = (end.busy_s - start.busy_s) - (end.own_s - start.own_s)
    return max(0.0, other / (end.wall_s - start.wall_s))


def git_commit(repo: Path = REPO_ROOT) -> str:
    """`git rev-parse --short HEAD` of the repository, or "unknown"."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def git_source_dirty(repo: Path = REPO_ROOT) -> bool | None:
    """Whether bn_cuda's sources differ from the commit (None when git cannot tell)."""
    try:
        result = subprocess.run(
            ["git", "status", "--porcelain", "--", "bn_cuda", "csrc", "setup.py"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(result.stdout.strip()) if result.returncode == 0 else None


def metadata(
    device: torch.device, dtype: torch.dtype, threads: int, argv: Sequence[str], extra: dict[str, Any]
) -> dict[str, Any]:
    """Everything needed to tell where and how a result was measured."""
    cuda = device.type == "cuda"
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "device_slug": device_slug(device, threads),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "bn_cuda_commit": git_commit(),
        "bn_cuda_source_dirty": git_source_dirty(),
        "threads": threads,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).removeprefix("torch."),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cache_bytes": cache_bytes(device),
    }
    info.update(extra)
    return info
