"""Builds bn_cuda._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension.

Environment:
  BN_CUDA_FORCE_CPU=1     build the CPU-only flavour even when CUDA is available.
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for. Unset with a GPU visible: that GPU's.
                          Unset with no GPU visible: DEFAULT_CUDA_ARCHS below.
  CUDA_HOME               the CUDA toolkit root (its bin/nvcc is used).
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "bn_cuda: building needs PyTorch already installed; install torch first, "
        "then run: pip install --no-build-isolation ."
    )

# Ampere (A100) and Hopper (H100/H200) as SASS, plus Hopper PTX so newer GPUs can JIT it.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("BN_CUDA_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cuda_wheel_include_dirs() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) that torch's CUDA dependency wheels ship, which a minimal
    toolkit lacks but ATen/cuda/CUDAContext.h includes."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidate = os.path.join(entry, sub)
            if os.path.isdir(candidate):
                dirs.append(candidate)
    return dirs


def openmp_flags() -> list[str]:
    """-fopenmp when torch uses OpenMP: ATen's at::parallel_for is then header-only
    (ParallelOpenMP.h, `#pragma omp parallel`), and without the flag the compiler drops the pragma
    and every CPU kernel runs on one thread."""
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        return ["-fopenmp"]
    return []


def extension():
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "running_stats.cpp", "autograd.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0: the debug info Python's default flags ask for triples build time and size.
    cxx_flags = ["-O3", "-g0", *openmp_flags()]
    link_flags = openmp_flags()
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "bn_cuda._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs += cuda_wheel_include_dirs()
    return cpp_extension.CUDAExtension(
        "bn_cuda._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("BN_CUDA_WITH_CUDA", None)],
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        },
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
