"""Memory layout (TESTPLAN 24-25): channels_last in, channels_last out (and grad); shapes where
NCHW and channels_last strides coincide; grad_output in another layout than the input; permuted,
sliced, expanded and transposed inputs. Values are PyTorch's on the same tensors, whatever the
strides, and outputs are dense in the input's memory format (csrc/op_checks.h, view_format).
"""

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, assert_no_worse_than_torch, reference_batch_norm
from torch import nn
from torch._prims_common import suggest_memory_format

import bn_cuda

REDUCED = (torch.float16, torch.bfloat16)
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
CLS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def run_both(x, grad_output, training, dtype=None):
    """Forward and backward of torch.nn's and bn_cuda's module (same parameters) on ``x`` and of
    the float64 reference. Returns three lists [output, grad_input, grad_weight, grad_bias], and
    in training the running mean and variance after the step."""
    dtype = dtype or x.dtype
    c = x.shape[1]
    params = torch.float32 if dtype in REDUCED else dtype
    ref = getattr(nn, CLS[x.dim()])(c, device=x.device, dtype=params)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, c))
        ref.bias.copy_(torch.linspace(-0.5, 0.5, c))
        ref.running_mean.copy_(torch.linspace(-0.2, 0.3, c))
        ref.running_var.copy_(torch.linspace(0.7, 1.4, c))
    m = getattr(bn_cuda, CLS[x.dim()])(c, device=x.device, dtype=params)
    m.load_state_dict(ref.state_dict())
    rm, rv = ref.running_mean.clone(), ref.running_var.clone()
    results = []
    for module in (ref, m):
        module.train(training)
        xi = x.detach().requires_grad_()
        y = module(xi)
        # autograd.grad, not .grad: AccumulateGrad would restride x.grad like x and hide the
        # layout the backward kernel produced.
        grads = torch.autograd.grad(y, [xi, module.weight, module.bias], grad_output)
        results.append([y.detach(), *grads])
        if training:
            results[-1] += [module.running_mean.clone(), module.running_var.clone()]
    x64 = x.detach().double().requires_grad_()
    w = ref.weight.detach().double().requires_grad_()
    b = ref.bias.detach().double().requires_grad_()
    y64, mean64, var64 = reference_batch_norm(x64, w, b, training=training, running_mean=rm, running_var=rv)
    y64.backward(grad_output.double())
    results.append([y64.detach(), x64.grad, w.grad, b.grad])
    if training:  # the running statistics after one step of momentum 0.1
        n = x.numel() // c
        results[-1] += [
            0.9 * rm.double() + 0.1 * mean64.detach(),
            0.9 * rv.double() + 0.1 * var64.detach() * n / (n - 1),
        ]
    return results


def assert_matches_torch(x, grad_output, training):
    """bn_cuda equals PyTorch on these exact tensors; returns bn_cuda's results."""
    expected, actual, exact = run_both(x, grad_output, training)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape and a.dtype == e.dtype
        if x.dtype not in REDUCED:
            try:
                torch.testing.assert_close(a, e)
            except AssertionError:
                # Float32 sums over thousands of values (weight/bias gradients, statistics) in
                # another order than PyTorch's: within a few ulp of its distance to float64.
                assert_no_worse_than_torch(a, e, exact[i], x.dtype, f"result {i}")
        elif i < 4:
            assert_no_worse_than_torch(a, e, exact[i], x.dtype, f"result {i}")
        else:  # running statistics, float32
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    return actual


def kernel_format(x):
    """The format outputs are dense in: 4D/5D only; on the CPU PyTorch's CPU rule (the format the
    input is dense in, contiguous first), else suggest_memory_format (cuDNN's choice); an empty
    input's as empty_like keeps it."""
    if x.dim() not in (4, 5):
        return torch.contiguous_format
    if x.numel() == 0:  # as empty_like keeps it
        return CL[x.dim()] if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format
    if x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(memory_format=CL[x.dim()]):
        return CL[x.dim()]
    return suggest_memory_format(x)


def assert_dense_in_suggested_format(t, x):
    fmt = kernel_format(x)
    assert t.is_contiguous(memory_format=fmt), (t.stride(), x.stride())


# ---- 24: channels_last ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("training", [True, False])
# (32, 8, 16, 16): 8192 rows of 8 channels, several of the CPU kernel's channels-last row blocks.
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (2, 3, 4, 3, 5), (3, 40, 7, 7), (32, 8, 16, 16)])
def test_channels_last_in_channels_last_out(device, dtype, training, shape):
    torch.manual_seed(0)
    fmt = CL[len(shape)]
    x_nchw = (torch.randn(shape, device=device) * 1.5 + 0.5).to(dtype)
    g_nchw = torch.randn(shape, device=device).to(dtype)
    x, g = x_nchw.contiguous(memory_format=fmt), g_nchw.contiguous(memory_format=fmt)
    y, grad_input = assert_matches_torch(x, g, training)[:2]
    assert y.is_contiguous(memory_format=fmt)
    assert grad_input.is_contiguous(memory_format=fmt)
    # Same values as from the NCHW copy of the same data, up to rounding.
    y_nchw, grad_nchw = assert_matches_torch(x_nchw, g_nchw, training)[:2]
    assert y_nchw.is_contiguous()
    assert grad_nchw.is_contiguous()
    for a, b in [(y, y_nchw), (grad_input, grad_nchw)]:
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=4 * torch.finfo(dtype).eps * scale, rtol=0)


# ---- 25: ambiguous shapes, mixed layouts, non-contiguous ----------------------------------------------

AMBIGUOUS = [(4, 1, 9, 9), (4, 9, 1, 1), (2, 8, 8, 1), (2, 8, 1, 8)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", AMBIGUOUS)
@pytest.mark.parametrize("x_format", LAYOUTS)
@pytest.mark.parametrize("grad_format", LAYOUTS)
def test_ambiguous_shapes(device, training, shape, x_format, grad_format):
    """Shapes where a tensor can be contiguous in both formats, or the strides alone do not say
    which one is meant: no silent reordering of values."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).contiguous(memory_format=x_format)
    g = torch.randn(shape, device=device).contiguous(memory_format=grad_format)
    y, grad_input = assert_matches_torch(x, g, training)[:2]
    assert_dense_in_suggested_format(y, x)
    assert_dense_in_suggested_format(grad_input, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("x_format", "grad_format"), [(LAYOUTS[0], LAYOUTS[1]), (LAYOUTS[1], LAYOUTS[0])])
def test_grad_output_in_other_layout(device, dtype, training, x_format, grad_format):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, device=device).to(dtype).contiguous(memory_format=x_format)
    g = torch.randn(3, 5, 4, 6, device=device).to(dtype).contiguous(memory_format=grad_format)
    grad_input = assert_matches_torch(x, g, training)[1]
    assert grad_input.is_contiguous(memory_format=x_format)


def non_contiguous_inputs(device):
    """(name, tensor): inputs whose strides match neither NCHW nor channels_last."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=g) * 2 + 1).to(device)

    return {
        "permuted-nhcw": rand(3, 4, 5, 6).permute(0, 2, 1, 3),
        "permuted-nwhc": rand(3, 6, 4, 5).permute(0, 3, 2, 1),
        "transposed-hw": rand(3, 5, 4, 6).transpose(2, 3),
        "channel-slice": rand(3, 10, 4, 6)[:, ::2],
        "spatial-slice": rand(3, 5, 6, 8)[..., 1:-1, ::2],
        "batch-slice": rand(6, 5, 4, 6)[::2],
        "channels-last-channel-slice": rand(3, 8, 4, 6).contiguous(memory_format=torch.channels_last)[:, 1:6],
        "expanded-batch": rand(1, 5, 4, 6).expand(3, 5, 4, 6),
        "1d-transposed": rand(5, 7).t(),
        "1d-nlc": rand(3, 7, 5).transpose(1, 2),
        "3d-permuted": rand(2, 3, 4, 5, 3).permute(0, 4, 1, 2, 3),
    }


NON_CONTIGUOUS = list(non_contiguous_inputs("cpu"))
NON_CONTIGUOUS = list(non_contiguous_inputs("cpu"))


def channels_last_odd_strides():
    """Inputs dense in channels_last whose size-1 dims have strides suggest_memory_format() reads
    as contiguous: images stored HWC, permuted and unsqueezed, as image pipelines make them."""
    g = torch.Generator().manual_seed(0)
    return {
        "hwc-image": torch.randn(32, 32, 3, generator=g).permute(2, 0, 1)[None],
        "nlc-unsqueezed": torch.randn(2, 5, 3, generator=g).transpose(1, 2).unsqueeze(-1),
        "dhwc-volume": torch.randn(4, 4, 4, 3, generator=g).permute(3, 0, 1, 2)[None],
    }


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", [*channels_last_odd_strides(), *NON_CONTIGUOUS, "ambiguous-n1hw"])
def test_cpu_output_strides_as_pytorch(training, name):
    """On the CPU, y and grad_input have the strides PyTorch's CPU batch norm gives them (its
    rule, not suggest_memory_format: channels_last in, channels_last out, for the odd strides
    of a permuted HWC image too; grad_input channels_last there only where grad_output has
    those strides as well)."""
    inputs = {**channels_last_odd_strides(), **non_contiguous_inputs("cpu")}
    inputs["ambiguous-n1hw"] = torch.randn(4, 1, 9, 9).contiguous(memory_format=torch.channels_last)
    x = inputs[name]
    cls = CLS[x.dim()]
    strides = []
    for module in (getattr(nn, cls)(x.shape[1]), getattr(bn_cuda, cls)(x.shape[1])):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
        y = module.train(training)(xi)
        # grad_output laid out like y, and like x (PyTorch's grad_input layout depends on both).
        grads = [torch.autograd.grad(y, xi, torch.ones_like(g), retain_graph=True)[0] for g in (y, xi)]
        strides.append((y.stride(), *(g.stride() for g in grads)))
    assert strides[1] == strides[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NON_CONTIGUOUS)
def test_non_contiguous_input(device, training, name):
    x = non_contiguous_inputs(device)[name]
    x_before = x.clone()
    g = torch.randn(x.shape, device=device)
    y, grad_input = assert_matches_torch(x, g, training)[:2]
    assert_dense_in_suggested_format(y, x)
    assert_dense_in_suggested_format(grad_input, x)
    assert torch.equal(x, x_before)
    # The same values as for a contiguous copy: nothing was read in the wrong order.
    y_dense, grad_dense = assert_matches_torch(x.contiguous(), g.contiguous(), training)[:2]
    torch.testing.assert_close(y, y_dense)
    torch.testing.assert_close(grad_input, grad_dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_format", LAYOUTS)
@pytest.mark.parametrize("grad_kind", ["expanded", "permuted", "sliced"])
def test_non_contiguous_grad_output(device, training, x_format, grad_kind):
    """grad_output with zero strides (what ``y.sum().backward()`` produces) or arbitrary strides."""
    shape = (3, 5, 4, 6)
    x = torch.randn(shape, device=device).contiguous(memory_format=x_format)
    g = {
        "expanded": torch.randn(1, 5, 1, 6, device=device).expand(shape),
        "permuted": torch.randn(3, 6, 4, 5, device=device).permute(0, 3, 2, 1),
        "sliced": torch.randn(3, 5, 8, 6, device=device)[:, :, ::2],
    }[grad_kind]
    assert not g.is_contiguous() and not g.is_contiguous(memory_format=torch.channels_last)
    grad_input = assert_matches_torch(x, g, training)[1]
    assert grad_input.is_contiguous(memory_format=x_format)


def assert_gradients_of_definition(x, weight, grad_output, training, generator):
    """bn_cuda's (dx, dweight) for x (requires grad) and weight are those of the definition in
    float64; in eval with running statistics drawn from `generator`."""
    c = x.shape[1]
    running_mean = torch.randn(c, generator=generator).to(x.device)
    running_var = torch.rand(c, generator=generator).to(x.device) + 0.5
    out = bn_cuda.functional.batch_norm(x, running_mean.clone(), running_var.clone(), weight, None, training)
    grads = torch.autograd.grad(out, (x, weight), grad_output)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = reference_batch_norm(x64, w64, training=training, running_mean=running_mean, running_var=running_var)[0]
    expected = torch.autograd.grad(ref, (x64, w64), grad_output.double())
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad_format", [torch.contiguous_format, torch.channels_last])
def test_gradients_of_odd_strided_channels_last_input(device, training, grad_format):
    """A permuted HWC image (dense in channels_last, odd stride on its size-1 batch dim) with
    grad_output in either layout: the gradients of the definition, in float64. PyTorch 2.14's CPU
    backward reads such an input as NCHW when grad_output is NCHW, and its dx and dweight are off
    by O(1) there."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 3, generator=g).permute(2, 0, 1)[None].to(device).requires_grad_()
    grad_output = torch.randn(1, 3, 5, 6, generator=g).to(device).contiguous(memory_format=grad_format)
    weight = torch.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
    assert_gradients_of_definition(x, weight, grad_output, training, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 1), (4, 3, 1, 1), (4, 3, 2)])
def test_gradients_with_strided_weight(device, training, shape):
    """A weight that is a strided view (every other value of a longer tensor): the gradients of
    the definition. PyTorch 2.14's CPU backward gets dx wrong by O(1) for such a weight when the
    spatial size is 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    grad_output = torch.randn(shape, generator=g).to(device)
    weight = torch.randn(6, generator=g).to(device)[::2].requires_grad_()
    assert_gradients_of_definition(x, weight, grad_output, training, g)
