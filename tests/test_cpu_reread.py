"""The CPU channels-last passes that re-read x right after a full read of it (the training
forward's normalization after the statistics, the backward's dx after its sums) read it through a
prefetching loop where x is at most 16 MiB (map_cached_rows) and through the plain row loop above
that (csrc/cpu/batch_norm.cpp, rereads_from_cache); dx of 8 MiB and more goes out by non-temporal
stores from either loop (streams_output). Either way the forward must give the bits of the
normalize op, which reads x once and always through the plain loop, and dx must be as exact as
PyTorch's."""

import pytest
import torch
from conftest import assert_no_worse_than_torch

import bn_cuda  # noqa: F401  (registers torch.ops.bn_cuda)

# channels_last: 2 MiB of float32 over 40 channels (the cached loop, whole vector steps and a
# tail per row) and 17 MiB (the plain loop: above the 16 MiB bound; y below the 32 MiB from which
# it is streamed, dx above its 8 MiB).
SHAPES = [(8, 40, 40, 41), (17, 64, 64, 64)]
# dx also at 10 MiB: the cached loop with streamed stores.
DX_SHAPES = [*SHAPES, (10, 64, 64, 64)]


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.rand(shape[1], generator=g) + 0.5
    bias = torch.randn(shape[1], generator=g)
    return x, dy, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_forward_matches_normalize(shape, dtype):
    x, _, weight, bias = _inputs(shape, dtype)
    y, mean, invstd, _ = torch.ops.bn_cuda.forward_train(x, weight, bias, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.ops.bn_cuda.normalize(x, mean, invstd, weight, bias))


@pytest.mark.parametrize("shape", DX_SHAPES)
def test_training_backward_dx(shape):
    x, dy, weight, _ = _inputs(shape, torch.float32)
    _, mean, invstd, _ = torch.ops.bn_cuda.forward_train(x, weight, None, 1e-5)
    dx = torch.ops.bn_cuda.backward(dy, x, mean, invstd, weight, True, [True, False, False])[0]
    assert dx.is_contiguous(memory_format=torch.channels_last)
    expected = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, mean, invstd, True, 1e-5, [True, False, False]
    )[0]
    # float64 from the definition, with the batch statistics of the same values.
    dims = (0, 2, 3)
    x64, dy64 = x.double(), dy.double()
    mean64 = x64.mean(dims, keepdim=True)
    invstd64 = (x64.var(dims, correction=0, keepdim=True) + 1e-5).rsqrt()
    xhat = (x64 - mean64) * invstd64
    ref = (dy64 - dy64.mean(dims, keepdim=True) - xhat * (dy64 * xhat).mean(dims, keepdim=True)) * invstd64
    ref = ref * weight.double().view(1, -1, 1, 1)
    assert_no_worse_than_torch(dx, expected, ref, torch.float32, "dx")
