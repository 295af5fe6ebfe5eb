"""The CPU kernels' loops are compiled for two instruction sets (csrc/cpu/vec_loops.h): x86-64-v3
where the CPU has it, the x86-64 baseline otherwise. The suite runs the best one this machine has;
these tests check that choice and run the kernel tests again on the baseline, which
BN_CUDA_CPU_ISA=baseline forces in a fresh process."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import bn_cuda

TESTS = Path(__file__).parent


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_best_isa_is_picked():
    isa = bn_cuda.build_info()["cpu_isa"]
    assert isa in ("x86-64-v3", "baseline")
    if os.environ.get("BN_CUDA_CPU_ISA") == "baseline":
        assert isa == "baseline"
    elif platform.machine() == "x86_64" and {"avx2", "fma", "f16c", "bmi2", "movbe"} <= cpu_flags():
        assert isa == "x86-64-v3"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="one instruction set off x86-64")
def test_baseline_loops_pass_the_kernel_tests():
    env = dict(os.environ, BN_CUDA_CPU_ISA="baseline")
    script = (
        "import sys, pytest, bn_cuda\n"
        "assert bn_cuda.build_info()['cpu_isa'] == 'baseline'\n"
        "sys.exit(pytest.main(sys.argv[1:]))\n"
    )
    names = (
        "test_numerics.py",
        "test_memory_format.py",
        "test_ops.py",
        "test_autograd.py",
        "test_pytorch_samples.py",
        "test_degenerate_shapes.py",
        "test_cpu_isa.py",
    )
    files = [str(TESTS / name) for name in names]
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-k",
            "not cuda and not baseline_loops",
            *files,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
