"""bn_cuda: fast batch normalization for PyTorch, a drop-in for torch.nn.BatchNorm1d/2d/3d.

>>> import bn_cuda
>>> bn = bn_cuda.BatchNorm2d(64)                  # same constructor as nn.BatchNorm2d
>>> model = bn_cuda.convert_model(model)          # swaps every nn.BatchNorm*d, keeps weights
>>> y = bn_cuda.functional.batch_norm(x, rm, rv, w, b, training=True)
>>> model = bn_cuda.convert_model(model, sync=True)   # SyncBatchNorm for multi-process training
>>> model = bn_cuda.revert_model(model)           # back to torch.nn's classes (e.g. to fuse)
"""

from __future__ import annotations

import torch

# _C loads the kernels and registers torch.ops.bn_cuda; ops then adds fake kernels and autograd.
from . import _C, functional, ops  # noqa: F401
from .functional import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_model, revert_model
from .sync_batchnorm import SyncBatchNorm

__version__ = "0.1.0"
__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "build_info",
    "convert_model",
    "cpu_cache_info",
    "empty_cpu_cache",
    "functional",
    "revert_model",
]


def build_info() -> dict[str, object]:
    """Which backends the compiled extension has, and the torch it runs with.

    Returns a dict: ``cpu`` and ``cuda`` (bool: kernels compiled in), ``cuda_available``
    (a GPU usable right now), ``cpu_isa`` (the instruction set the CPU kernels' loops run with:
    "x86-64-v3" (AVX2, FMA, F16C) where the CPU has it, else "baseline"; the environment variable
    BN_CUDA_CPU_ISA=baseline, read at the first CPU call, forces the baseline), ``torch`` (version
    string), ``torch_cuda`` (torch's CUDA version or None).
    """

    def has_kernel(key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key("bn_cuda::forward_train", key)

    return {
        "cpu": has_kernel("CPU"),
        "cuda": has_kernel("CUDA"),
        "cuda_available": torch.cuda.is_available(),
        "cpu_isa": _C.cpu_isa(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def cpu_cache_info() -> dict[str, int]:
    """The cache that holds the memory of freed large CPU outputs (1 MiB and more) for reuse.

    A fresh large output costs a page fault per page on its first write, often more than the
    kernel itself; reusing a freed block of the same size costs none (as PyTorch's CUDA caching
    allocator does on the GPU). Returns ``cached_bytes`` (freed blocks held now), ``limit_bytes``
    (the most it holds: the environment variable BN_CUDA_CPU_CACHE_MB, read at the first large
    output, default 1024; 0 turns caching off), and ``hits`` / ``misses`` (large outputs served
    from the cache / from fresh memory).
    """
    cached, limit, hits, misses = _C.cpu_cache_info()
    return {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses}


def empty_cpu_cache() -> None:
    """Releases the memory of every freed CPU output that the cache holds (see cpu_cache_info)."""
    _C.empty_cpu_cache()
