"""Degenerate shapes (TESTPLAN 13-14): empty batches and spatial dims, one value per spatial
position, one channel, channel counts that are not a multiple of a vector width, odd spatial sizes,
and tensors that do not start at an aligned address.

Each case runs bn_cuda's module and torch.nn's on the same input, parameters and grad_output and
compares output, input/weight/bias gradients and running statistics (float32/float64: PyTorch
within assert_close's defaults; float16/bfloat16: bn_cuda at most 2x as far as PyTorch from the
float64 reference).
"""

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, assert_no_worse_than_torch, reference_batch_norm
from torch import nn

import bn_cuda

REDUCED = (torch.float16, torch.bfloat16)


def param_dtype(dtype):
    # float16/bfloat16 input with float32 parameters, the mixed-precision configuration.
    return torch.float32 if dtype in REDUCED else dtype


def make_pair(cls, c, device, dtype, momentum=0.1):
    """nn.<cls> and bn_cuda.<cls> with the same non-trivial parameters and running statistics."""
    ref = getattr(nn, cls)(c, momentum=momentum, device=device, dtype=param_dtype(dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, c))
        ref.bias.copy_(torch.linspace(-0.3, 0.3, c))
        ref.running_mean.copy_(torch.linspace(-0.1, 0.2, c))
        ref.running_var.copy_(torch.linspace(0.9, 1.3, c))
    m = getattr(bn_cuda, cls)(c, momentum=momentum, device=device, dtype=param_dtype(dtype))
    m.load_state_dict(ref.state_dict())
    return ref, m


def run(module, x, grad_output, training):
    module.train(training)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_output)
    return {
        "output": y.detach(),
        "grad_input": x.grad,
        "grad_weight": module.weight.grad,
        "grad_bias": module.bias.grad,
        "running_mean": module.running_mean.clone(),
        "running_var": module.running_var.clone(),
        "num_batches_tracked": module.num_batches_tracked.clone(),
    }


def reference(x, grad_output, ref_module, training):
    """float64 output, gradients and updated running statistics from the definition."""
    c = x.shape[1]
    x64 = x.detach().double().requires_grad_()
    w = ref_module.weight.detach().double().requires_grad_()
    b = ref_module.bias.detach().double().requires_grad_()
    rm0, rv0 = ref_module.running_mean.double(), ref_module.running_var.double()
    y, mean, var = reference_batch_norm(x64, w, b, training=training, running_mean=rm0, running_var=rv0)
    y.backward(grad_output.double())
    out = {"output": y.detach(), "grad_input": x64.grad, "grad_weight": w.grad, "grad_bias": b.grad}
    count = x.numel() // c
    if training and count > 1:
        f = ref_module.momentum
        out["running_mean"] = (1 - f) * rm0 + f * mean.detach()
        out["running_var"] = (1 - f) * rv0 + f * var.detach() * count / (count - 1)
    else:
        out["running_mean"], out["running_var"] = rm0, rv0
    return out


def assert_matches(actual, expected, ref64, input_dtype):
    """bn_cuda's ``actual`` against PyTorch's ``expected``; for float16/bfloat16 input by distance to
    the float64 reference ``ref64``."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if input_dtype not in REDUCED:
        try:
            torch.testing.assert_close(actual, expected)
        except AssertionError:
            # Float32 sums over many values in another order than PyTorch's: within a few ulp.
            assert_no_worse_than_torch(actual, expected, ref64, input_dtype)
        return
    assert_no_worse_than_torch(actual, expected, ref64, input_dtype)


def compare(cls, x, training, grad_output=None, momentum=0.1):
    dtype = x.dtype
    ref, m = make_pair(cls, x.shape[1], x.device, dtype, momentum)
    if grad_output is None:
        grad_output = torch.randn(x.shape, device=x.device).to(dtype)
    expected_ref64 = reference(x, grad_output, ref, training)
    # PyTorch's own CUDA kernels (cuDNN) read a grad_output that starts off a 16-byte boundary
    # out of bounds (compute-sanitizer: invalid global reads; then "misaligned address"), so
    # PyTorch gets an aligned copy; bn_cuda gets grad_output as it is.
    expected = run(ref, x, grad_output.clone(), training)
    actual = run(m, x, grad_output, training)
    for key in ("output", "grad_input", "grad_weight", "grad_bias"):
        assert_matches(actual[key], expected[key], expected_ref64[key], dtype)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(actual[key].double(), expected_ref64[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)
    assert actual["num_batches_tracked"].item() == expected["num_batches_tracked"].item()
    return actual


# ---- 13: empty tensors ----------------------------------------------------------------------------

EMPTY_SHAPES = [
    ("BatchNorm2d", (0, 3, 4, 4)),
    ("BatchNorm2d", (2, 3, 0, 4)),
    ("BatchNorm2d", (2, 3, 4, 0)),
    ("BatchNorm2d", (0, 3, 0, 0)),
    ("BatchNorm1d", (0, 3)),
    ("BatchNorm1d", (4, 3, 0)),
    ("BatchNorm3d", (2, 3, 2, 0, 2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("cls", "shape"), EMPTY_SHAPES)
def test_empty_input_training(device, dtype, momentum, cls, shape):
    """No values per channel: an empty output, zero weight/bias gradients, running statistics
    unchanged and num_batches_tracked incremented, as in PyTorch."""
    x = torch.randn(shape, device=device).to(dtype)
    ref, m = make_pair(cls, shape[1], device, dtype, momentum)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = run(m, x, torch.randn(shape, device=device).to(dtype), training=True)
    expected = run(ref, x, torch.randn(shape, device=device).to(dtype), training=True)
    assert out["output"].shape == x.shape and out["output"].dtype == dtype
    assert out["grad_input"].shape == x.shape
    assert torch.equal(out["grad_weight"], torch.zeros_like(m.weight))
    assert torch.equal(out["grad_bias"], torch.zeros_like(m.bias))
    assert torch.equal(out["running_mean"], before["running_mean"])
    assert torch.equal(out["running_var"], before["running_var"])
    assert out["num_batches_tracked"].item() == 1 == expected["num_batches_tracked"].item()
    torch.testing.assert_close(out["running_mean"], expected["running_mean"])
    torch.testing.assert_close(out["running_var"], expected["running_var"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_empty_input_eval_and_functional(device, shape, memory_format):
    x = torch.randn(shape, device=device).to(memory_format=memory_format)
    _, m = make_pair("BatchNorm2d", 3, device, torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m.eval()(x)
    assert y.shape == x.shape
    y = bn_cuda.batch_norm(x, None, None, m.weight, m.bias, training=True)
    assert y.shape == x.shape
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- 14: small, odd and unaligned shapes ---------------------------------------------------------

SHAPES = [
    ("BatchNorm2d", (4, 3, 1, 1)),  # H*W = 1: the BatchNorm1d-like case
    ("BatchNorm2d", (2, 3, 1, 1)),  # two values per channel, the fewest that train
    ("BatchNorm2d", (8, 1, 5, 5)),  # C = 1
    ("BatchNorm2d", (3, 5, 3, 5)),  # C and H*W odd
    ("BatchNorm2d", (2, 33, 3, 3)),  # C = 32 + 1
    ("BatchNorm2d", (2, 7, 1, 1)),
    ("BatchNorm2d", (5, 6, 7, 1)),
    ("BatchNorm1d", (16, 5)),
    ("BatchNorm1d", (4, 5, 7)),
    ("BatchNorm3d", (2, 3, 3, 1, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("cls", "shape"), SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_small_and_odd_shapes(device, dtype, training, cls, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    compare(cls, x, training)


def unaligned(shape, device, dtype, channels_last=False):
    """A tensor of ``shape`` whose data starts one element into its storage."""
    if channels_last:
        n, c, h, w = shape
        flat = torch.randn(n * c * h * w + 1, device=device).to(dtype)
        t = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        flat = torch.randn(torch.Size(shape).numel() + 1, device=device).to(dtype)
        t = flat[1:].view(shape)
    assert t.storage_offset() == 1
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (3, 33, 2, 2), (4, 8, 1, 1)])
def test_unaligned_input_and_grad(device, dtype, training, channels_last, shape):
    """Input and grad_output that start at element 1 of their storage (not 16-byte aligned)."""
    torch.manual_seed(0)
    x = unaligned(shape, device, dtype, channels_last)
    x_before = x.clone()
    grad_output = unaligned(shape, device, dtype, channels_last)
    compare("BatchNorm2d", x, training, grad_output)
    assert torch.equal(x, x_before)
