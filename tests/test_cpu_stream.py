"""Large CPU outputs are written with non-temporal stores (csrc/cpu/batch_norm.cpp,
streams_output): y of the forwards, dx of the backwards, where every channels-last row or
channels-first plane is whole 64-byte lines. BN_CUDA_CPU_STREAM_MB=0 streams every such output, so
a fresh process with it runs the streaming loops on small tensors; they must give the same bits
as the plain stores of this process (the default thresholds, 32 MiB for y and 8 MiB for dx, are far
above these tensors)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bn_cuda  # noqa: F401  (registers torch.ops.bn_cuda)

ROOT = Path(__file__).parent.parent

# (shape, channels_last): runs of whole lines in both layouts (planes and rows of 64 floats),
# channels-first planes long enough for the channel-at-a-time passes (64x64), short planes that
# are not whole lines (7x7, 3 channels: plain stores on every path), and 16-bit runs of one line.
CASES = [
    ((4, 64, 8, 8), False),
    ((4, 64, 8, 8), True),
    ((2, 4, 64, 64), False),
    ((2, 32, 64, 64), True),
    ((3, 5, 7, 7), False),
    ((3, 3, 7, 7), True),
    ((2, 32, 4, 8), False),
]
DTYPES = ["float32", "float64", "float16", "bfloat16"]

# Runs every elementwise output path once per case and dtype and saves the outputs.
SCRIPT = """
import sys, torch, bn_cuda
from tests.test_cpu_stream import outputs
torch.save(outputs(), sys.argv[1])
"""


def outputs() -> dict[str, torch.Tensor]:
    """Every op output that an elementwise pass writes, for all cases, from fixed inputs."""
    ops = torch.ops.bn_cuda
    result = {}
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for shape, channels_last in CASES:
            gen = torch.Generator().manual_seed(0)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            c = shape[1]
            x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
            dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
            param = torch.float64 if dtype == torch.float64 else torch.float32
            w = (torch.rand(c, generator=gen) + 0.5).to(param)
            b = torch.randn(c, generator=gen).to(param)
            rm = torch.randn(c, generator=gen).to(param)
            rv = (torch.rand(c, generator=gen) + 0.5).to(param)
            key = f"{dtype_name}-{'x'.join(map(str, shape))}-{'nhwc' if channels_last else 'nchw'}"
            y, mean, invstd, _ = ops.forward_train(x, w, b, 1e-5)
            result[f"{key}-forward_train"] = y
            result[f"{key}-forward_eval"] = ops.forward_eval(x, rm, rv, w, b, 1e-5)
            result[f"{key}-normalize"] = ops.normalize(x, mean, invstd, w, b)
            result[f"{key}-backward_train"] = ops.backward(dy, x, mean, invstd, w, True, [True, True, True])[0]
            result[f"{key}-backward_eval"] = ops.backward(dy, x, rm, invstd, w, False, [True, True, True])[0]
            sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
            n = x.numel() // c
            result[f"{key}-backward_elemt"] = ops.backward_elemt(dy, x, mean, invstd, w, sum_dy / n, sum_dy_xmu / n)
    return result


def run_fresh(script: str, stream_mb: str | None, *args: str) -> str:
    """Runs `script` in a fresh interpreter with BN_CUDA_CPU_STREAM_MB set to `stream_mb` (or
    unset: None), read there at the first call; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "BN_CUDA_CPU_STREAM_MB"}
    if stream_mb is not None:
        env["BN_CUDA_CPU_STREAM_MB"] = stream_mb
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_streamed_outputs_match_plain_stores(tmp_path):
    out = tmp_path / "streamed.pt"
    run_fresh(SCRIPT, "0", str(out))
    streamed = torch.load(out)
    plain = outputs()
    assert streamed.keys() == plain.keys()
    for key, expected in plain.items():
        got = streamed[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert got.stride() == expected.stride(), key
        # Same bits (NaN-free inputs): the store kind must not change a value.
        assert torch.equal(got, expected), key


BOUNDS_SCRIPT = """
from bn_cuda import _C
print(*_C.cpu_stream_bounds())
"""


@pytest.mark.parametrize(
    "env, expected",
    [
        (None, (32 << 20, 8 << 20)),  # y from 32 MiB, dx from 8 MiB
        ("7", (7 << 20, 7 << 20)),
        ("0", (0, 0)),
        ("7x", (32 << 20, 8 << 20)),  # not a number: ignored, not 0 (which would stream every output)
        ("-3", (32 << 20, 8 << 20)),
    ],
)
def test_stream_bounds_from_the_environment(env, expected):
    """BN_CUDA_CPU_STREAM_MB, read at the first call, sets both bounds; without it (or with a
    value that is not a whole number of MiB) each output keeps its own."""
    assert tuple(int(v) for v in run_fresh(BOUNDS_SCRIPT, env).split()) == expected


def test_set_cpu_stream_mb_changes_the_bounds_in_process():
    """bn_cuda._C.set_cpu_stream_mb (bench/op_time.py --ab-stream-mb) overrides both bounds and
    returns the setting it replaced; -1 gives each output its own bound back."""
    from bn_cuda import _C

    previous = _C.set_cpu_stream_mb(5)
    try:
        assert _C.cpu_stream_bounds() == (5 << 20, 5 << 20)
        assert _C.set_cpu_stream_mb(-1) == 5
        assert _C.cpu_stream_bounds() == (32 << 20, 8 << 20)
    finally:
        _C.set_cpu_stream_mb(previous)
