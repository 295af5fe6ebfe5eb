"""Gradients of bn_cuda: gradcheck / gradgradcheck in float64 (TESTPLAN 26, 29), gradients against
torch.nn.BatchNorm, partial requires_grad, reduced-precision input, and the op-level autograd."""

import pytest
import torch
from conftest import DEVICES
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import bn_cuda
from bn_cuda.functional import batch_norm

ops = torch.ops.bn_cuda
CL = torch.channels_last
CL3D = torch.channels_last_3d

# (id, shape, memory format): BatchNorm1d (N, C) and (N, C, L), BatchNorm2d, BatchNorm3d.
LAYOUTS = [
    ("1d_nc", (6, 3), torch.contiguous_format),
    ("1d_ncl", (4, 3, 5), torch.contiguous_format),
    ("2d_nchw", (3, 3, 2, 3), torch.contiguous_format),
    ("2d_channels_last", (3, 3, 2, 3), CL),
    ("3d_ncdhw", (2, 3, 2, 2, 3), torch.contiguous_format),
    ("3d_channels_last", (2, 3, 2, 2, 3), CL3D),
]
LAYOUT_PARAMS = pytest.mark.parametrize(
    ("shape", "memory_format"), [p[1:] for p in LAYOUTS], ids=[p[0] for p in LAYOUTS]
)


def rand(shape, device, dtype=torch.float64, memory_format=torch.contiguous_format, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return t.contiguous(memory_format=memory_format).requires_grad_(requires_grad)


def channel_params(c, device, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    rm = (0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
    return w.requires_grad_(requires_grad), b.requires_grad_(requires_grad), rm, rv


# ---- gradcheck / gradgradcheck of the functional (TESTPLAN 26, 29) ---------------------------


@pytest.mark.parametrize("device", DEVICES)
@LAYOUT_PARAMS
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_params"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_functional(training, affine, shape, memory_format, device):
    x = rand(shape, device, memory_format=memory_format)
    w, b, rm, rv = channel_params(shape[1], device)
    if affine:
        assert gradcheck(lambda x, w, b: batch_norm(x, rm, rv, w, b, training=training), (x, w, b))
    else:
        assert gradcheck(lambda x: batch_norm(x, rm, rv, None, None, training=training), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_training_without_running_stats(device):
    x = rand((4, 3, 2, 2), device)
    w, b, _, _ = channel_params(3, device)
    assert gradcheck(lambda x, w, b: batch_norm(x, None, None, w, b, training=True, eps=1e-3), (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["weight_only", "bias_only"])
def test_gradcheck_one_param(which, training, device):
    # An absent weight or bias shifts the autograd edges of the parameter that is there.
    x = rand((3, 3, 2, 3), device)
    w, b, rm, rv = channel_params(3, device)
    if which == "weight_only":
        assert gradcheck(lambda x, w: batch_norm(x, rm, rv, w, None, training=training), (x, w))
    else:
        assert gradcheck(lambda x, b: batch_norm(x, rm, rv, None, b, training=training), (x, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_forward_ops_give_only_the_gradients_asked_for(which, device):
    # Each of input, weight and bias alone requiring grad: its gradient is PyTorch's, the
    # others stay None.
    for training in (True, False):
        x, w, b = (
            rand(s, device, seed=i, requires_grad=(n == which))
            for i, (n, s) in enumerate((("input", (4, 3, 2, 2)), ("weight", (3,)), ("bias", (3,))))
        )
        _, _, rm, rv = channel_params(3, device)
        y = ops.forward_train(x, w, b, 1e-5)[0] if training else ops.forward_eval(x, rm, rv, w, b, 1e-5)
        y.pow(2).sum().backward()
        leaves = [t.detach().requires_grad_(n == which) for n, t in (("input", x), ("weight", w), ("bias", b))]
        ref = torch.nn.functional.batch_norm(leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], training)
        ref.pow(2).sum().backward()
        for name, got, want in zip(("input", "weight", "bias"), (x, w, b), leaves, strict=True):
            if name == which:
                torch.testing.assert_close(got.grad, want.grad)
            else:
                assert got.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_forward_eval_refuses_gradients_of_the_running_statistics(device):
    x = rand((4, 3, 2, 2), device)
    w, b, rm, rv = channel_params(3, device)
    y = ops.forward_eval(x, rm.clone().requires_grad_(), rv, w, b, 1e-5)
    with pytest.raises(RuntimeError, match="not differentiable with respect to the running statistics"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((6, 3), torch.contiguous_format), ((3, 3, 2, 3), torch.contiguous_format), ((3, 3, 2, 3), CL)],
    ids=["1d", "nchw", "channels_last"],
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_params"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_functional(training, affine, shape, memory_format, device):
    x = rand(shape, device, memory_format=memory_format)
    w, b, rm, rv = channel_params(shape[1], device)
    if affine:
        assert gradgradcheck(lambda x, w, b: batch_norm(x, rm, rv, w, b, training=training), (x, w, b))
    else:
        assert gradgradcheck(lambda x: batch_norm(x, rm, rv, None, None, training=training), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_create_graph_gives_the_same_first_gradients(training, device):
    """backward(create_graph=True) (used for gradient penalties) takes another code path; its
    gradients for input, weight and bias are the plain ones."""
    x = rand((3, 3, 2, 3), device)
    w, b, rm, rv = channel_params(3, device)
    dy = rand((3, 3, 2, 3), device, seed=7, requires_grad=False)
    y = batch_norm(x, rm, rv, w, b, training=training)
    plain = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    graph = torch.autograd.grad(y, (x, w, b), dy, create_graph=True, allow_unused=True)
    for name, p, g in zip(("input", "weight", "bias"), plain, graph, strict=True):
        assert g is not None, f"{name} gradient missing with create_graph=True"
        torch.testing.assert_close(g, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_nn(training, device):
    """Second-order gradients (loss + ||dL/dx||^2) equal those of nn.BatchNorm2d in float64."""
    results = []
    for cls in (nn.BatchNorm2d, bn_cuda.BatchNorm2d):
        torch.manual_seed(0)
        m = cls(3, device=device, dtype=torch.float64)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
        m.train(training)
        x = rand((4, 3, 3, 2), device)
        y = m(x)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)).pow(2).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.pow(2).sum()).backward()
        results.append((x.grad, m.weight.grad, m.bias.grad))
    for ref, got in zip(*results, strict=True):
        assert got is not None
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_gradcheck_module_affine_false(memory_format, training, device):
    m = bn_cuda.BatchNorm2d(3, affine=False, device=device, dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.fill_(0.2)
        m.running_var.fill_(1.7)
    m.train(training)
    x = rand((3, 3, 2, 3), device, memory_format=memory_format)
    assert gradcheck(m, (x,))
    assert gradgradcheck(m, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_module_no_running_stats_eval(device):
    m = bn_cuda.BatchNorm2d(3, track_running_stats=False, device=device, dtype=torch.float64).eval()
    x = rand((3, 3, 2, 3), device)
    assert gradcheck(m, (x,))


# ---- gradients against nn.BatchNorm ---------------------------------------------------------------

NN_CASES = [
    ("1d_nc", nn.BatchNorm1d, bn_cuda.BatchNorm1d, (16, 5), torch.contiguous_format),
    ("1d_ncl", nn.BatchNorm1d, bn_cuda.BatchNorm1d, (4, 5, 7), torch.contiguous_format),
    ("2d_nchw", nn.BatchNorm2d, bn_cuda.BatchNorm2d, (4, 5, 6, 7), torch.contiguous_format),
    ("2d_channels_last", nn.BatchNorm2d, bn_cuda.BatchNorm2d, (4, 5, 6, 7), CL),
    ("2d_hw1", nn.BatchNorm2d, bn_cuda.BatchNorm2d, (8, 33, 1, 1), torch.contiguous_format),
    ("3d", nn.BatchNorm3d, bn_cuda.BatchNorm3d, (2, 5, 3, 4, 5), torch.contiguous_format),
]


def paired_modules(nn_cls, bn_cls, c, device, dtype=torch.float32, **kwargs):
    ref = nn_cls(c, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        if ref.running_mean is not None:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 1.5)
    mine = bn_cls(c, device=device, dtype=dtype, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("nn_cls", "bn_cls", "shape", "memory_format"), [c[1:] for c in NN_CASES], ids=[c[0] for c in NN_CASES]
)
def test_grads_match_nn_float32(nn_cls, bn_cls, shape, memory_format, training, device):
    torch.manual_seed(0)
    ref, mine = paired_modules(nn_cls, bn_cls, shape[1], device)
    ref.train(training)
    mine.train(training)
    x_ref = rand(shape, device, torch.float32, memory_format)
    x_mine = x_ref.detach().clone().requires_grad_()
    dy = rand(shape, device, torch.float32, memory_format, seed=3, requires_grad=False)
    y_ref, y_mine = ref(x_ref), mine(x_mine)
    y_ref.backward(dy)
    y_mine.backward(dy)
    torch.testing.assert_close(y_mine, y_ref)
    torch.testing.assert_close(x_mine.grad, x_ref.grad)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad)
    if memory_format != torch.contiguous_format:
        assert x_mine.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "wanted",
    [("weight", "bias"), ("weight",), ("bias",), ("input",), ("input", "bias")],
    ids=lambda w: "+".join(w),
)
def test_partial_requires_grad(wanted, training, device):
    """Only some of input / weight / bias require grad (e.g. a first layer, whose input does not):
    those get gradients equal to nn.BatchNorm2d's, the others none."""
    torch.manual_seed(0)
    ref, mine = paired_modules(nn.BatchNorm2d, bn_cuda.BatchNorm2d, 4, device)
    for m in (ref, mine):
        m.train(training)
        m.weight.requires_grad_("weight" in wanted)
        m.bias.requires_grad_("bias" in wanted)
    x_ref = rand((3, 4, 5, 5), device, torch.float32, requires_grad="input" in wanted)
    x_mine = x_ref.detach().clone().requires_grad_("input" in wanted)
    dy = rand((3, 4, 5, 5), device, torch.float32, seed=3, requires_grad=False)
    ref(x_ref).backward(dy)
    mine(x_mine).backward(dy)
    for name, got, expected in (
        ("input", x_mine.grad, x_ref.grad),
        ("weight", mine.weight.grad, ref.weight.grad),
        ("bias", mine.bias.grad, ref.bias.grad),
    ):
        if name in wanted:
            torch.testing.assert_close(got, expected)
        else:
            assert got is None


@pytest.mark.parametrize("device", DEVICES)
def test_no_input_requires_grad_gives_no_graph(device):
    x = rand((3, 4, 5, 5), device, torch.float32, requires_grad=False)
    y = batch_norm(x, None, None, torch.ones(4, device=device), torch.zeros(4, device=device), training=True)
    assert not y.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_input_float32_params(dtype, memory_format, training, device):
    """Half / bfloat16 input with float32 weight and bias: output and input grad in the input's
    dtype, weight/bias grads float32; errors against a float64 computation no worse than
    nn.BatchNorm2d's (2x + a small atol)."""
    torch.manual_seed(0)
    ref, mine = paired_modules(nn.BatchNorm2d, bn_cuda.BatchNorm2d, 4, device)
    ref64 = nn.BatchNorm2d(4, device=device, dtype=torch.float64)
    ref64.load_state_dict(ref.state_dict())
    x = rand((4, 4, 6, 5), device, dtype, memory_format, requires_grad=False)
    dy = rand((4, 4, 6, 5), device, dtype, memory_format, seed=3, requires_grad=False)
    grads = {}
    for key, m, xdtype in (("nn", ref, dtype), ("mine", mine, dtype), ("f64", ref64, torch.float64)):
        m.train(training)
        xi = x.detach().to(xdtype).requires_grad_()
        y = m(xi)
        y.backward(dy.to(xdtype))
        grads[key] = (y, xi.grad, m.weight.grad, m.bias.grad)
    y, gx, gw, gb = grads["mine"]
    assert y.dtype == gx.dtype == dtype
    assert gw.dtype == gb.dtype == torch.float32
    assert gx.is_contiguous(memory_format=memory_format)
    for got, theirs, exact in zip(grads["mine"], grads["nn"], grads["f64"], strict=True):
        err = (got.double() - exact).abs().max().item()
        err_nn = (theirs.double() - exact).abs().max().item()
        assert err <= 2 * err_nn + 1e-3 * max(1.0, exact.abs().max().item()), (err, err_nn)


# ---- op-level autograd -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_gradcheck_stats(memory_format, device):
    x = rand((3, 4, 2, 3), device, memory_format=memory_format)
    assert gradcheck(ops.stats, (x,))
    assert gradgradcheck(ops.stats, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_stats_mean_only_and_var_only(device):
    x = rand((5, 3), device)
    assert gradcheck(lambda x: ops.stats(x)[0], (x,))
    assert gradcheck(lambda x: ops.stats(x)[1], (x,))


def normalize_args(device, memory_format=torch.contiguous_format):
    x = rand((3, 4, 2, 3), device, memory_format=memory_format)
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    invstd = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    w, b, _, _ = channel_params(4, device)
    return x, mean, invstd, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_gradcheck_normalize(memory_format, device):
    args = normalize_args(device, memory_format)
    assert gradcheck(ops.normalize, args)
    x, mean, invstd, _, _ = args
    assert gradcheck(lambda x, m, s: ops.normalize(x, m, s, None, None), (x, mean, invstd))


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_double_backward_is_right_or_refused(device):
    """TESTPLAN 29 for the normalize op: second derivatives are correct, or asking for them raises
    a RuntimeError; never silently wrong."""
    args = normalize_args(device)
    try:
        ok = gradgradcheck(ops.normalize, args, raise_exception=False)
    except RuntimeError as e:
        assert "normalize" in str(e) or "double backward" in str(e) or "not supported" in str(e)
        return
    assert ok, "double backward of bn_cuda.normalize gives wrong second derivatives"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_gradcheck_forward_ops(memory_format, device):
    x = rand((3, 4, 2, 3), device, memory_format=memory_format)
    w, b, rm, rv = channel_params(4, device)
    assert gradcheck(lambda x, w, b: ops.forward_train(x, w, b, 1e-5)[0], (x, w, b))
    assert gradcheck(lambda x, w, b: ops.forward_eval(x, rm, rv, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_train_statistics_are_not_differentiable(device):
    x = rand((3, 4, 2, 3), device)
    _, mean, invstd, var = ops.forward_train(x, None, None, 1e-5)
    assert not mean.requires_grad and not invstd.requires_grad and not var.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_forward_eval_refuses_grad_of_running_stats(device):
    x = rand((3, 4, 2, 3), device)
    _, _, rm, rv = channel_params(4, device)
    y = ops.forward_eval(x, rm.requires_grad_(), rv, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="running"):
        y.sum().backward()
