"""The implementations a run compares: bn_cuda (the candidate) and PyTorch's baselines per device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CANDIDATE = "bn_cuda"


class CandidateUnavailable(RuntimeError):
    """bn_cuda cannot be imported (not built, or built for another torch)."""


def _no_context() -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def _cudnn_off() -> AbstractContextManager[Any]:
    """PyTorch's own CUDA kernels: with cuDNN disabled, batch_norm dispatches to ATen's native ones."""
    return torch.backends.cudnn.flags(enabled=False)


@dataclass(frozen=True)
class Impl:
    """One implementation: how to build its module for C channels and how to run it.

    The runner moves the module to the device, loads the shared initial state, and wraps it in
    torch.compile when `compile` is set. Every call of the module (forward, backward, warm-up)
    runs inside `context()`.
    """

    name: str
    label: str
    make: Callable[[int], nn.Module]
    compile: bool = False
    context: Callable[[], AbstractContextManager[Any]] = field(default=_no_context)
    candidate: bool = False


def candidate_impl() -> Impl:
    """bn_cuda.BatchNorm2d, imported on demand so that bench itself imports without the extension."""
    try:
        import bn_cuda  # imported here: optional until the extension is built
    except ImportError as error:
        raise CandidateUnavailable(
            f"cannot import bn_cuda ({type(error).__name__}: {error}); build it first: make build"
        ) from error
    return Impl(CANDIDATE, "bn_cuda", bn_cuda.BatchNorm2d, candidate=True)


def candidate_info() -> dict[str, Any]:
    """bn_cuda's build_info() when it can be imported, for the run's metadata."""
    try:
        import bn_cuda  # imported here: optional until the extension is built
    except ImportError:
        return {}
    build_info = getattr(bn_cuda, "build_info", None)
    return dict(build_info()) if callable(build_info) else {}


def baseline_impls(device_type: str) -> list[Impl]:
    """PyTorch's batch norm as users run it, per device type ("cpu" or "cuda")."""
    if device_type == "cuda":
        return [
            Impl("torch", "nn.BatchNorm2d (cuDNN)", nn.BatchNorm2d),
            Impl("torch_native", "nn.BatchNorm2d (native)", nn.BatchNorm2d, context=_cudnn_off),
            Impl("torch_compile", "torch.compile", nn.BatchNorm2d, compile=True),
        ]
    return [
        Impl("torch", "nn.BatchNorm2d", nn.BatchNorm2d),
        Impl("torch_compile", "torch.compile", nn.BatchNorm2d, compile=True),
    ]


def default_impls(device_type: str) -> list[Impl]:
    """bn_cuda followed by the baselines of the device type."""
    return [candidate_impl(), *baseline_impls(device_type)]


def check_impls(impls: list[Impl]) -> None:
    """Raise ValueError unless there is exactly one candidate, at least one baseline and unique names."""
    names = [impl.name for impl in impls]
    if len(set(names)) != len(names):
        raise ValueError(f"implementation names must be unique, got {names}")
    if sum(impl.candidate for impl in impls) != 1:
        raise ValueError("exactly one implementation must be the candidate")
    if len(impls) < 2:
        raise ValueError("need at least one baseline next to the candidate")
