"""Runs the benchmark: for each shape and memory format, builds inputs and modules once, then times
every pass of every implementation side by side and yields one Row per pass."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench import passes
from bench.impls import Impl, check_impls
from bench.records import Cell, Row
from bench.shapes import Shape
from bench.timing import Contender, Timer, TimingPolicy, interleave, make_timer, repetitions, summarize

MEMORY_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# Largest difference from the float64 reference, relative to its largest magnitude, that still
# counts as a correct result. Float32 sums over ~1e6 elements per channel legitimately lose ~1e-4
# (PyTorch's own CPU channels_last backward does); a broken kernel is off by O(1).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# Rotating more inputs than this buys nothing: such tiny inputs are launch-bound anyway.
MAX_ROTATION = 64

# Dynamo compiles each module once per (shape, format, mode); the default recompile limit could be
# hit by a long run without this headroom.
RECOMPILE_LIMIT = 64

SEED = 0


@dataclass(frozen=True)
class RunConfig:
    """What to measure: device, input dtype, shapes, memory formats, passes and timing policy.

    cache_bytes is the last-level cache (GPU L2, CPU LLC) that the rotated inputs must exceed.
    """

    device: torch.device
    dtype: torch.dtype
    shapes: Sequence[Shape]
    formats: Sequence[str]
    passes: Sequence[str]
    policy: TimingPolicy
    cache_bytes: int


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameter and running-stat dtype for an input dtype: float32 for half types, as under
    mixed-precision training, and the input dtype otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotation_count(input_bytes: int, cache_bytes: int) -> int:
    """Distinct inputs to cycle through so that together they are twice the cache: an input is
    then evicted before it is used again, and the time is of DRAM traffic, not of cache hits."""
    return max(2, min(MAX_ROTATION, math.ceil(2 * cache_bytes / max(input_bytes, 1))))


def row_labels(config: RunConfig) -> list[str]:
    """ "shape format pass" of every row `run` yields, in order."""
    return [f"{s} {f} {p}" for s in config.shapes for f in config.formats for p in config.passes]


def run(config: RunConfig, impls: Sequence[Impl]) -> Iterator[Row]:
    """Measure every (shape, format, pass), yielding each Row as soon as it is complete."""
    check_impls(list(impls))
    timer = make_timer(config.device)
    with _compile_settings(any(impl.compile for impl in impls)):
        for shape in config.shapes:
            for memory_format in config.formats:
                yield from _run_case(config, impls, timer, shape, memory_format)


@contextmanager
def _compile_settings(enabled: bool) -> Iterator[None]:
    """Raise Dynamo's recompile limit for the run only, and drop compiled code after it."""
    if not enabled:
        yield
        return
    import torch._dynamo  # imported here: slow to import and only needed with compiled baselines

    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{key: RECOMPILE_LIMIT}):
        try:
            yield
        finally:
            torch._dynamo.reset()


def _random(
    shape: Shape, config: RunConfig, generator: torch.Generator, memory_format: torch.memory_format
) -> torch.Tensor:
    """N(0.5, 2^2) data in the run's dtype and memory format; the non-zero mean keeps a kernel that
    forgets to subtract it from passing the cross-check."""
    base = torch.randn(shape.dims, generator=generator, device=config.device, dtype=param_dtype(config.dtype))
    return base.mul_(2.0).add_(0.5).to(dtype=config.dtype, memory_format=memory_format)


def _initial_state(channels: int, config: RunConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Non-trivial parameters and running statistics, shared by every implementation, so that eval
    outputs are comparable and no kernel is helped by weight = 1, bias = 0."""

    def randn() -> torch.Tensor:
        return torch.randn(channels, generator=generator, device=config.device, dtype=param_dtype(config.dtype))

    return {
        "weight": 1.0 + 0.1 * randn(),
        "bias": 0.1 * randn(),
        "running_mean": 0.1 * randn(),
        "running_var": 1.0 + 0.1 * randn().abs(),
    }


def _load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the shared state into a module (or the module inside a compiled one)."""
    target = getattr(module, "_orig_mod", module)
    with torch.no_grad():
        for name, value in state.items():
            tensor = getattr(target, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.copy_(value)
        counter = getattr(target, "num_batches_tracked", None)
        if isinstance(counter, torch.Tensor):
            counter.zero_()


def _build(impl: Impl, channels: int, config: RunConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """An implementation's module on the device with the shared state; compiled if it asks to be."""
    module = impl.make(channels).to(device=config.device, dtype=param_dtype(config.dtype))
    _load_state(module, state)
    # dynamic=False: one static-shape graph per shape, as a model with fixed input size gets.
    return torch.compile(module, dynamic=False) if impl.compile else module


def _run_case(
    config: RunConfig, impls: Sequence[Impl], timer: Timer, shape: Shape, memory_format: str
) -> Iterator[Row]:
    """All passes of one shape and memory format; inputs and modules are shared by the passes."""
    if any(impl.compile for impl in impls):
        # Compiled once per shape: code for other shapes must not count towards recompile limits.
        torch._dynamo.reset()
    generator = torch.Generator(device=config.device).manual_seed(SEED)
    layout = MEMORY_FORMATS[memory_format]
    itemsize = config.dtype.itemsize
    rotation = rotation_count(shape.numel * itemsize, config.cache_bytes)
    xs = [_random(shape, config, generator, layout).requires_grad_() for _ in range(rotation)]
    needs_dy = any(p in ("bwd", "fwd+bwd") for p in config.passes)
    dys = [_random(shape, config, generator, layout) for _ in range(rotation)] if needs_dy else []
    state = _initial_state(shape.c, config, generator)

    modules: dict[str, nn.Module] = {}
    build_failures: dict[str, Cell] = {}
    for impl in impls:
        try:
            modules[impl.name] = _build(impl, shape.c, config, state)
        except Exception as error:
            build_failures[impl.name] = Cell.from_exception(error)

    for pass_name in config.passes:
        row = Row(shape, memory_format, pass_name, str(config.dtype).removeprefix("torch."), itemsize, rotation)
        _run_pass(config, impls, timer, modules, build_failures, state, xs, dys, row)
        yield row

    del modules, xs, dys
    gc.collect()
    if config.device.type == "cuda":
        torch.cuda.empty_cache()


def _run_pass(
    config: RunConfig,
    impls: Sequence[Impl],
    timer: Timer,
    modules: dict[str, nn.Module],
    build_failures: dict[str, Cell],
    state: dict[str, torch.Tensor],
    xs: Sequence[torch.Tensor],
    dys: Sequence[torch.Tensor],
    row: Row,
) -> None:
    """Time one pass of every implementation, interleaved, and fill the row's cells."""
    contenders: list[Contender] = []
    sample_seconds: list[float] = []
    for impl in impls:
        if impl.name in build_failures:
            continue
        module = modules[impl.name]
        contender = Contender(impl.name, _unbound, impl.context, row.rotation)
        try:
            # Every pass starts from the same state, so eval outputs (which use the running
            # statistics) are comparable across implementations.
            _load_state(module, state)
            with impl.context():
                contender.step = passes.bind(row.pass_name, module, xs, dys)
            sample_seconds.append(contender.warm_up(timer, config.policy))
        except Exception as error:
            contender.fail(error)
        contenders.append(contender)

    errors = _cross_check(contenders, row.pass_name, row.shape, state, xs, dys)
    interleave(contenders, timer, repetitions(sample_seconds, config.policy))
    peaks = _peak_memory(contenders, config.device) if config.device.type == "cuda" else {}

    by_name = {c.name: c for c in contenders}
    for impl in impls:
        if impl.name in build_failures:
            row.cells[impl.name] = build_failures[impl.name]
            continue
        row.cells[impl.name] = _cell(by_name[impl.name], errors.get(impl.name), config.dtype, peaks)


def _unbound(index: int) -> None:
    """Placeholder step of a contender whose binding has not happened (or failed)."""
    raise RuntimeError("the pass was not bound to this implementation")


def _cell(contender: Contender, max_err: float | None, dtype: torch.dtype, peaks: dict[str, int]) -> Cell:
    """The result of one contender: its time statistics, or its failure."""
    if contender.failed or not contender.samples:
        return Cell.failed(contender.error or "NoSamples", contender.error_detail)
    summary = summarize(contender.samples)
    return Cell(
        status="ok",
        median_s=summary.median_s,
        q1_s=summary.q1_s,
        q3_s=summary.q3_s,
        host_s=summary.host_s,
        reps=summary.reps,
        calls_per_sample=contender.calls_per_sample,
        peak_mem_bytes=peaks.get(contender.name),
        max_err=max_err,
        mismatch=max_err is not None and not max_err <= TOLERANCE[dtype],
    )


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a step's result (y, or the tuple of gradients)."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)]


def _relative_error(output: Any, reference: Any) -> float:
    """Largest |output - reference| over all result tensors, relative to the reference's largest
    magnitude (at least 1); infinite for a shape mismatch or non-finite difference."""
    worst = 0.0
    outs, refs = _tensors(output), _tensors(reference)
    if len(outs) != len(refs):
        return math.inf
    for out, ref in zip(outs, refs, strict=True):
        if out.shape != ref.shape:
            return math.inf
        if out.numel() == 0:
            continue
        diff = (out.detach().double() - ref.detach().double()).abs().max().item()
        scale = max(1.0, ref.detach().double().abs().max().item())
        worst = max(worst, diff / scale if math.isfinite(diff) else math.inf)
    return worst


def _float64_reference(
    pass_name: str, shape: Shape, state: dict[str, torch.Tensor], x: torch.Tensor, dy: torch.Tensor | None
) -> Any:
    """The pass's result from nn.BatchNorm2d in float64 on input 0: a reference more accurate than
    any implementation under test, so an error is attributed to the right side."""
    module = nn.BatchNorm2d(shape.c).to(device=x.device, dtype=torch.float64)
    _load_state(module, state)
    x64 = x.detach().double().requires_grad_()  # .double() keeps the memory format
    dys = [dy.double()] if dy is not None else []
    return passes.bind(pass_name, module, [x64], dys)(0)


def _cross_check(
    contenders: Sequence[Contender],
    pass_name: str,
    shape: Shape,
    state: dict[str, torch.Tensor],
    xs: Sequence[torch.Tensor],
    dys: Sequence[torch.Tensor],
) -> dict[str, float]:
    """Each working implementation's relative error against the float64 reference, on input 0."""
    live = [c for c in contenders if not c.failed]
    if not live:
        return {}
    expected = _float64_reference(pass_name, shape, state, xs[0], dys[0] if dys else None)
    errors = {}
    for contender in live:
        try:
            errors[contender.name] = _relative_error(contender.call(0), expected)
        except Exception as error:
            contender.fail(error)
    return errors


def _peak_memory(contenders: Sequence[Contender], device: torch.device) -> dict[str, int]:
    """Peak CUDA memory one call allocates beyond what is already held (inputs, graphs)."""
    peaks = {}
    for contender in contenders:
        if contender.failed:
            continue
        try:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            output = contender.call(0)
            torch.cuda.synchronize(device)
            peaks[contender.name] = torch.cuda.max_memory_allocated(device) - base
            del output
        except Exception as error:
            contender.fail(error)
    return peaks
