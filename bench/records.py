"""What a run produces: one Row per (shape, memory format, pass), one Cell per implementation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench import bandwidth
from bench.shapes import Shape

# A Cell's time counts as launch overhead when the host spent at least this fraction of it issuing
# the calls: the device was waiting for work, not running kernels.
HOST_BOUND_FRACTION = 0.9

# A Cell is noisy when its interquartile range exceeds this fraction of its median: the samples
# disagree (typically other work on the machine), so the median is a weak estimate.
NOISY_SPREAD = 0.25


def describe_error(error: BaseException) -> tuple[str, str]:
    """An exception as (type name, first line of its message, at most 300 characters)."""
    return type(error).__name__, (str(error).strip().splitlines() or [""])[0][:300]


@dataclass
class Cell:
    """One implementation's result in a row. Times are seconds per call.

    status is "ok" or "failed"; a failed cell keeps the exception type in `error`.
    max_err is the largest difference from a float64 reference (nn.BatchNorm2d in float64 on the
    same input), relative to the reference's largest magnitude; mismatch says it exceeded the
    dtype's tolerance.
    """

    status: str
    error: str | None = None
    error_detail: str | None = None
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    host_s: float | None = None
    reps: int = 0
    calls_per_sample: int = 0
    peak_mem_bytes: int | None = None
    max_err: float | None = None
    mismatch: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_s is not None

    @property
    def host_bound(self) -> bool:
        """True when the time measured the host issuing calls (CUDA only; on the CPU host is device)."""
        if self.status != "ok" or self.host_s is None or self.median_s is None:
            return False
        return self.host_s >= HOST_BOUND_FRACTION * self.median_s

    @property
    def noisy(self) -> bool:
        """True when the samples spread widely around the median."""
        if self.status != "ok" or self.median_s is None or self.q1_s is None or self.q3_s is None:
            return False
        return self.q3_s - self.q1_s > NOISY_SPREAD * self.median_s

    @classmethod
    def failed(cls, error: str, detail: str | None = None) -> Cell:
        """A cell for an implementation that raised `error` (an exception type name)."""
        return cls(status="failed", error=error, error_detail=detail)

    @classmethod
    def from_exception(cls, error: BaseException) -> Cell:
        """A failed cell describing `error`."""
        return cls.failed(*describe_error(error))


@dataclass
class Row:
    """Results of every implementation for one shape, memory format and pass."""

    shape: Shape
    memory_format: str
    pass_name: str
    dtype: str
    itemsize: int
    rotation: int
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def min_bytes(self) -> int:
        return bandwidth.min_bytes(self.shape.numel, self.itemsize, self.pass_name)

    def seconds(self, name: str) -> float | None:
        cell = self.cells.get(name)
        return cell.median_s if cell is not None and cell.ok else None

    def speedup(self, candidate: str, baseline: str) -> float | None:
        """Baseline time over candidate time (> 1: the candidate is faster); None if either failed."""
        fast, slow = self.seconds(candidate), self.seconds(baseline)
        return slow / fast if fast and slow else None

    def gbps(self, name: str) -> float | None:
        """Effective bandwidth of an implementation, counting the pass's minimal bytes."""
        seconds = self.seconds(name)
        return bandwidth.gbps(self.min_bytes, seconds) if seconds else None

    def pct_of_limit(self, name: str, copy_gbps: float) -> float | None:
        """An implementation's time against moving the minimal bytes at copy bandwidth, in percent."""
        seconds = self.seconds(name)
        return bandwidth.pct_of_limit(self.min_bytes, seconds, copy_gbps) if seconds else None


@dataclass(frozen=True)
class ImplInfo:
    """Name (column key) and label (table heading) of an implementation in a run."""

    name: str
    label: str
    candidate: bool


@dataclass
class Results:
    """A whole run: metadata, the measured copy bandwidth, the implementations and the rows."""

    metadata: dict[str, Any]
    copy_gbps: float
    impls: list[ImplInfo]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def candidate(self) -> str:
        return next(impl.name for impl in self.impls if impl.candidate)

    @property
    def baselines(self) -> list[ImplInfo]:
        return [impl for impl in self.impls if not impl.candidate]
