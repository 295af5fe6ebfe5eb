"""Timing: warm-up, calibration, and samples taken round-robin across implementations.

A sample is a block of calls timed together (CUDA events on the GPU, perf_counter on the CPU) and
divided by the call count, so short kernels are timed over a measurable interval. Implementations
are sampled in turn within every repetition, with a rotating start, so that clock or thermal drift
and background load hit all of them alike; the reported time is the median over samples.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from bench.passes import Step
from bench.records import describe_error


@dataclass(frozen=True)
class Sample:
    """Seconds per call in one block: on the device, and spent by the host issuing the calls
    (None on the CPU, where issuing the calls is the work)."""

    device_s: float
    host_s: float | None


class Timer(Protocol):
    """Times `run(calls)` and returns the time per call."""

    def measure(self, run: Callable[[int], None], calls: int) -> Sample: ...


class CpuTimer:
    """Wall-clock timer for work that runs on the calling threads."""

    def measure(self, run: Callable[[int], None], calls: int) -> Sample:
        start = time.perf_counter()
        run(calls)
        return Sample((time.perf_counter() - start) / calls, None)


class CudaTimer:
    """CUDA-event timer on the current stream.

    The device is synchronized first so that no earlier work (another implementation's) overlaps
    the block. The host time of the launches is recorded too: when it is close to the device
    time, the block measured launch overhead rather than the kernels.
    """

    def measure(self, run: Callable[[int], None], calls: int) -> Sample:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        host_start = time.perf_counter()
        start.record()
        run(calls)
        end.record()
        host_s = (time.perf_counter() - host_start) / calls
        end.synchronize()
        return Sample(start.elapsed_time(end) / 1e3 / calls, host_s)


def make_timer(device: torch.device) -> Timer:
    """The timer for a device."""
    return CudaTimer() if device.type == "cuda" else CpuTimer()


@dataclass(frozen=True)
class TimingPolicy:
    """How long to warm up and sample.

    warmup_calls: calls before timing (at least one per rotated input, so that every input has
        been touched and compiled code is built). sample_target_s: calls per sample are chosen so a
        sample lasts about this long. budget_s: time for all implementations of one row together,
        spread over repetitions, bounded by min_reps and max_reps.
    """

    warmup_calls: int
    sample_target_s: float
    budget_s: float
    min_reps: int
    max_reps: int
    max_calls_per_sample: int = 1000


CPU_POLICY = TimingPolicy(warmup_calls=2, sample_target_s=0.01, budget_s=1.0, min_reps=5, max_reps=50)
CUDA_POLICY = TimingPolicy(warmup_calls=5, sample_target_s=0.002, budget_s=0.4, min_reps=20, max_reps=200)


def default_policy(device: torch.device) -> TimingPolicy:
    """The timing policy for a device."""
    return CUDA_POLICY if device.type == "cuda" else CPU_POLICY


@dataclass
class Contender:
    """One implementation's step in a row: cycles through the rotated inputs inside its context.

    A contender that raises is marked failed (exception type and first line of the message) and
    takes no further part; the others carry on.
    """

    name: str
    step: Step
    context: Callable[[], AbstractContextManager[Any]]
    rotation: int
    calls_per_sample: int = 1
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    error_detail: str | None = None
    _next: int = 0

    @property
    def failed(self) -> bool:
        return self.error is not None

    def fail(self, error: BaseException) -> None:
        """Record an exception raised by this contender."""
        self.error, self.error_detail = describe_error(error)

    def run(self, calls: int) -> None:
        """Make `calls` calls, each on the next rotated input."""
        with self.context():
            for _ in range(calls):
                self.step(self._next % self.rotation)
                self._next += 1

    def call(self, index: int) -> Any:
        """One call on a given rotated input, returning its result (for cross-checks)."""
        with self.context():
            return self.step(index)

    def warm_up(self, timer: Timer, policy: TimingPolicy) -> float:
        """Warm up, choose the calls per sample, and return the expected seconds per sample."""
        self.run(max(policy.warmup_calls, self.rotation))
        per_call = timer.measure(self.run, 1).device_s
        if per_call * 4 < policy.sample_target_s:
            # One call is too short to estimate well; re-estimate over a block of calls.
            calls = min(policy.max_calls_per_sample, math.ceil(policy.sample_target_s / 4 / max(per_call, 1e-9)))
            per_call = timer.measure(self.run, calls).device_s
        self.calls_per_sample = max(
            1, min(policy.max_calls_per_sample, math.ceil(policy.sample_target_s / max(per_call, 1e-9)))
        )
        return per_call * self.calls_per_sample

    def take_sample(self, timer: Timer) -> None:
        """Time one block of calls; an exception marks the contender failed."""
        try:
            self.samples.append(timer.measure(self.run, self.calls_per_sample))
        except Exception as error:
            self.fail(error)


def repetitions(sample_seconds: Sequence[float], policy: TimingPolicy) -> int:
    """Repetitions that fit the row's budget, given each contender's seconds per sample."""
    per_rep = sum(sample_seconds)
    if per_rep <= 0:
        return policy.min_reps
    return max(policy.min_reps, min(policy.max_reps, math.floor(policy.budget_s / per_rep)))


def interleave(contenders: Sequence[Contender], timer: Timer, reps: int) -> None:
    """Take `reps` samples of every live contender, round-robin, starting one later each repetition."""
    for rep in range(reps):
        live = [c for c in contenders if not c.failed]
        if not live:
            return
        shift = rep % len(live)
        for contender in live[shift:] + live[:shift]:
            contender.take_sample(timer)


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of the per-call device time, and the median host time, in seconds."""

    median_s: float
    q1_s: float
    q3_s: float
    host_s: float | None
    reps: int


def summarize(samples: Sequence[Sample]) -> Summary:
    """Median and quartiles of a contender's samples (at least one)."""
    device = [s.device_s for s in samples]
    hosts = [s.host_s for s in samples if s.host_s is not None]
    if len(device) >= 2:
        q1, _, q3 = statistics.quantiles(device, n=4, method="inclusive")
    else:
        q1 = q3 = device[0]
    return Summary(
        median_s=statistics.median(device),
        q1_s=q1,
        q3_s=q3,
        host_s=statistics.median(hosts) if hosts else None,
        reps=len(samples),
    )
