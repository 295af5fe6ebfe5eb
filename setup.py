"""Builds bn_cuda._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension.

Environment:
  BN_CUDA_FORCE_CPU=1     build the CPU-only flavour even when CUDA is available.
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for. Unset with a GPU visible: that GPU's.
                          Unset with no GPU visible: DEFAULT_CUDA_ARCHS below.
  CUDA_HOME               the CUDA toolkit root (its bin/nvcc is used).
"""

import glob
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

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


def links_cxx_runtime_statically(compiler: str) -> bool:
    """Whether `compiler` puts the C++ runtime itself (libstdc++.a) into a shared library it
    links, instead of a dependency on libstdc++.so: checked on a one-function library, whose
    dynamic section names "libstdc++.so.6" among its needed libraries unless the runtime is inside."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        library = os.path.join(tmp, "probe.so")
        with open(source, "w") as f:
            f.write("#include <sstream>\nstd::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        try:
            subprocess.run(
                [compiler, "-shared", "-fPIC", source, "-o", library], check=True, capture_output=True, timeout=300
            )
            with open(library, "rb") as f:
                return b"libstdc++.so" not in f.read()
        except (OSError, subprocess.SubprocessError):
            return False


def shared_cxx_runtime_link_args() -> list[str]:
    """The C++ runtime this process already uses (torch's), named on the link line when the
    compiler would otherwise link its static libstdc++.a into the extension (seen: a GCC 13 under
    /opt/gcc on a GPU image). The extension then carried a second copy of the C++ runtime, and
    every error message that formats a number (TORCH_CHECK(..., count)) crashed in that copy's
    iostream code instead of raising. Named before the compiler's own -lstdc++, the shared runtime
    resolves those symbols and nothing is taken from the archive. With a compiler that links the
    shared runtime (the usual case) nothing is added."""
    if not sys.platform.startswith("linux"):
        return []
    compilers = []
    for command in (os.environ.get("CXX"), sysconfig.get_config_var("LDCXXSHARED"), sysconfig.get_config_var("CXX")):
        words = shlex.split(command) if command else []
        if words and words[0] not in compilers:
            compilers.append(words[0])
    if not any(links_cxx_runtime_statically(compiler) for compiler in compilers):
        return []
    with open("/proc/self/maps") as maps:
        loaded = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    return loaded[:1]


def extension():
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "running_stats.cpp", "autograd.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0: the debug info Python's default flags ask for triples build time and size.
    cxx_flags = ["-O3", "-g0", *openmp_flags()]
    link_flags = [*openmp_flags(), *shared_cxx_runtime_link_args()]
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
