"""Running statistics (TESTPLAN 15-19): the momentum update, the cumulative average, eval and
track_running_stats=False, affine/bias options, and state_dict interchange with torch.nn.

The modules are compared step by step with torch.nn's on the same inputs, and the statistics with
a float64 computation from the definition.
"""

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, needs_bias_argument, reference_batch_norm
from torch import nn

import bn_cuda
import bn_cuda.functional as BF

REDUCED = (torch.float16, torch.bfloat16)


def batches(steps, shape, device, dtype=torch.float32, seed=0):
    """Batches with different per-channel means and spreads, so every step moves the statistics."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    out = []
    for step in range(steps):
        loc = torch.linspace(-2, 3, c).view(view) + step
        scale = torch.linspace(0.5, 2, c).view(view) * (1 + 0.3 * step)
        out.append((torch.randn(shape, generator=g) * scale + loc).to(device, dtype))
    return out


def pair(device, dtype=torch.float32, cls="BatchNorm2d", c=4, **kwargs):
    ref = getattr(nn, cls)(c, device=device, dtype=dtype, **kwargs)
    m = getattr(bn_cuda, cls)(c, device=device, dtype=dtype, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.linspace(0.5, 1.5, c))
            if ref.bias is not None:
                ref.bias.copy_(torch.linspace(-1, 1, c))
    m.load_state_dict(ref.state_dict())
    return ref, m


def assert_same_state(m, ref):
    sd, sd_ref = m.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert sd[k].dtype == sd_ref[k].dtype, k
        torch.testing.assert_close(sd[k], sd_ref[k], msg=k)


def unbiased(var_biased, count):
    return var_biased * count / (count - 1)


# ---- 15: momentum = 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (2, 4, 1, 1), (3, 4, 7, 3)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_momentum_one_stores_batch_statistics(device, dtype, shape, memory_format):
    """running_mean == batch mean and running_var == unbiased batch variance of the float64 data."""
    stats_dtype = torch.float32 if dtype in REDUCED else dtype
    m = bn_cuda.BatchNorm2d(4, momentum=1.0, device=device, dtype=stats_dtype)
    x = batches(1, shape, device, dtype)[0].contiguous(memory_format=memory_format)
    m(x)
    _, mean, var = reference_batch_norm(x)
    count = x.numel() // 4
    torch.testing.assert_close(m.running_mean, mean.to(stats_dtype))
    torch.testing.assert_close(m.running_var, unbiased(var, count).to(stats_dtype))
    # The functional form updates the same way.
    rm, rv = torch.zeros(4, device=device, dtype=stats_dtype), torch.ones(4, device=device, dtype=stats_dtype)
    BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rm, m.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(rv, m.running_var, rtol=0, atol=0)


# ---- 16: momentum over several steps, cumulative average, 0, negative -------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.0, -0.5, 1.5, None])
@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_momentum_steps_match_pytorch(device, dtype, momentum, cls):
    shape = {"BatchNorm1d": (6, 4, 5), "BatchNorm2d": (3, 4, 3, 5), "BatchNorm3d": (2, 4, 2, 3, 2)}[cls]
    ref, m = pair(device, dtype, cls, momentum=momentum)
    for step, x in enumerate(batches(4, shape, device, dtype)):
        torch.testing.assert_close(m(x), ref(x))
        assert_same_state(m, ref)
        assert m.num_batches_tracked.item() == step + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [0, 5])
def test_momentum_none_is_the_cumulative_average(device, start):
    """momentum=None: factor 1 / num_batches_tracked, so from a fresh module the running statistics
    are the plain average of the batch statistics; a loaded counter continues the average."""
    ref, m = pair(device, torch.float64, momentum=None)
    with torch.no_grad():
        for mod in (ref, m):
            mod.num_batches_tracked.fill_(start)
    xs = batches(5, (4, 4, 3, 3), device, torch.float64)
    means, variances = [], []
    for x in xs:
        m(x)
        ref(x)
        _, mean, var = reference_batch_norm(x)
        means.append(mean)
        variances.append(unbiased(var, x.numel() // 4))
    assert m.num_batches_tracked.item() == start + len(xs)
    assert_same_state(m, ref)
    if start == 0:
        torch.testing.assert_close(m.running_mean, torch.stack(means).mean(0))
        torch.testing.assert_close(m.running_var, torch.stack(variances).mean(0))


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_zero_keeps_statistics_and_counts(device):
    _, m = pair(device, momentum=0.0)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        m.running_var.copy_(torch.tensor([0.25, 4.0, 1.5, 1.0]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for x in batches(3, (2, 4, 3, 3), device):
        m(x)
    assert torch.equal(m.running_mean, before["running_mean"])
    assert torch.equal(m.running_var, before["running_var"])
    assert m.num_batches_tracked.item() == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_reduced_precision_buffers(device, dtype, momentum):
    """A module converted to float16/bfloat16 keeps its statistics in that dtype; they stay within
    rounding of PyTorch's."""
    ref, m = pair(device, dtype, momentum=momentum)
    for x in batches(3, (4, 4, 4, 4), device, dtype):
        m(x)
        ref(x)
    assert m.running_mean.dtype == dtype and m.running_var.dtype == dtype
    tol = {"atol": 2 * torch.finfo(dtype).eps * 4, "rtol": 2 * torch.finfo(dtype).eps}
    torch.testing.assert_close(m.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(m.running_var, ref.running_var, **tol)
    assert m.num_batches_tracked.item() == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_functional_updates_strided_views(device, momentum):
    """Running statistics that are strided views into a larger buffer are updated through the view,
    leaving the elements in between alone."""
    x = batches(1, (4, 3, 5, 5), device)[0]
    buffers = {}
    for name, fn in (("torch", torch.nn.functional.batch_norm), ("bn_cuda", BF.batch_norm)):
        mean_buf = torch.arange(6.0, device=device)
        var_buf = torch.arange(1.0, 7.0, device=device)
        weight = torch.arange(1.0, 7.0, device=device)[::2]
        y = fn(x, mean_buf[::2], var_buf[::2], weight, None, training=True, momentum=momentum)
        buffers[name] = (y, mean_buf, var_buf)
    for actual, expected in zip(buffers["bn_cuda"], buffers["torch"], strict=True):
        torch.testing.assert_close(actual, expected)
    assert torch.equal(buffers["bn_cuda"][1][1::2], torch.tensor([1.0, 3.0, 5.0], device=device))


# ---- 17: eval, track_running_stats=False ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_eval_changes_nothing(device, dtype):
    stats_dtype = torch.float32 if dtype in REDUCED else dtype
    ref, m = pair(device, stats_dtype)
    for x in batches(2, (3, 4, 3, 3), device, dtype):
        m(x)
        ref(x)
    m.eval()
    ref.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = batches(1, (3, 4, 3, 3), device, dtype, seed=1)[0].requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    y_ref = ref(x.detach())
    if dtype in REDUCED:
        torch.testing.assert_close(y.float(), y_ref.float(), atol=4 * torch.finfo(dtype).eps * 8, rtol=0)
    else:
        torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats(device, training):
    """track_running_stats=False: no buffers, batch statistics in training and in eval."""
    ref, m = pair(device, track_running_stats=False)
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    m.train(training)
    ref.train(training)
    x = batches(1, (3, 4, 3, 3), device)[0]
    y = m(x)
    w, b = m.weight.detach(), m.bias.detach()
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(y, reference_batch_norm(x, w, b)[0].float())
    assert m.running_mean is None and m.num_batches_tracked is None


@pytest.mark.parametrize("device", DEVICES)
def test_track_running_stats_switched_off_after_construction(device):
    """Buffers exist but track_running_stats is False: training uses batch statistics and updates
    nothing; eval uses the (untouched) buffers. Same as PyTorch."""
    ref, m = pair(device)
    with torch.no_grad():
        for mod in (ref, m):
            mod.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
            mod.running_var.copy_(torch.tensor([0.25, 4.0, 1.5, 1.0]))
            mod.track_running_stats = False
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = batches(1, (3, 4, 3, 3), device)[0]
    torch.testing.assert_close(m(x), ref(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_set_to_none(device):
    """Running statistics removed from a tracking module (running_mean = running_var = None): batch
    statistics in both modes, and num_batches_tracked counts training calls as in PyTorch."""
    ref, m = pair(device)
    for mod in (ref, m):
        mod.running_mean = None
        mod.running_var = None
    x = batches(1, (3, 4, 3, 3), device)[0]
    torch.testing.assert_close(m(x), ref(x))
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item()


# ---- 18: affine=False, bias=False, checkpoints without num_batches_tracked -------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{"affine": False}, pytest.param({"bias": False}, marks=needs_bias_argument)])
def test_affine_options(device, options):
    ref, m = pair(device, **options)
    assert (m.weight is None) == (ref.weight is None) and m.bias is None
    assert m.state_dict().keys() == ref.state_dict().keys()
    for x in batches(2, (3, 4, 3, 3), device):
        x = x.requires_grad_()
        y, y_ref = m(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        (grad,) = torch.autograd.grad(y, x, torch.ones_like(y) + x.detach())
        (grad_ref,) = torch.autograd.grad(y_ref, x, torch.ones_like(y) + x.detach())
        torch.testing.assert_close(grad, grad_ref)
    assert_same_state(m, ref)
    if m.weight is not None:
        m.weight.grad = ref.weight.grad = None
        x = batches(1, (3, 4, 3, 3), device, seed=2)[0]
        m(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_loading_checkpoint_without_num_batches_tracked(device, momentum):
    """An old (version < 2) checkpoint has no num_batches_tracked: both modules load it, keep their
    counter, and then train identically (momentum=None reads the counter)."""
    source = nn.BatchNorm2d(4, momentum=momentum, device=device)
    for x in batches(3, (3, 4, 3, 3), device):
        source(x)
    sd = source.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ref, m = (
        nn.BatchNorm2d(4, momentum=momentum, device=device),
        bn_cuda.BatchNorm2d(4, momentum=momentum, device=device),
    )
    ref.load_state_dict(sd)
    m.load_state_dict(sd)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 0
    torch.testing.assert_close(m.running_mean, source.running_mean)
    for x in batches(2, (3, 4, 3, 3), device, seed=3):
        torch.testing.assert_close(m(x), ref(x))
    assert_same_state(m, ref)


# ---- 19: state_dict interchange -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_state_dict_from_torch_to_bn_cuda(device, momentum):
    ref = nn.BatchNorm2d(4, momentum=momentum, device=device)
    for x in batches(3, (3, 4, 3, 3), device):
        ref(x)
    m = bn_cuda.BatchNorm2d(4, momentum=momentum, device=device)
    m.load_state_dict(ref.state_dict())
    assert_same_state(m, ref)
    for x in batches(2, (3, 4, 3, 3), device, seed=4):
        torch.testing.assert_close(m(x), ref(x))
    assert_same_state(m, ref)
    x = batches(1, (3, 4, 3, 3), device, seed=5)[0]
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_state_dict_from_bn_cuda_to_torch(device, momentum):
    m = bn_cuda.BatchNorm2d(4, momentum=momentum, device=device)
    xs = batches(3, (3, 4, 3, 3), device)
    for x in xs:
        m(x)
    # The statistics bn_cuda accumulated are the float64 ones (momentum=None: the plain average).
    if momentum is None:
        means = torch.stack([reference_batch_norm(x)[1] for x in xs]).mean(0)
        torch.testing.assert_close(m.running_mean, means.float())
    ref = nn.BatchNorm2d(4, momentum=momentum, device=device)
    ref.load_state_dict(m.state_dict())
    assert_same_state(m, ref)
    x = batches(1, (3, 4, 3, 3), device, seed=5)[0]
    torch.testing.assert_close(ref.eval()(x), m.eval()(x))
    ref.train()
    m.train()
    torch.testing.assert_close(ref(x), m(x))
    assert_same_state(m, ref)


# ---- activation checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("then_relu", [False, True], ids=["bn-last", "bn-then-relu"])
def test_activation_checkpointing(then_relu, use_reentrant, device):
    """torch.utils.checkpoint recomputes the forward in the backward. Non-reentrant (PyTorch's
    recommended form) stops that recomputation once the backward has what it needs: where the
    batch norm saves the last tensors, before its running statistics would move, so a step leaves
    them, the counter and the gradients as a step without checkpointing does (README, "on
    purpose": nn.BatchNorm moves them in its kernel, so twice). With a ReLU after it (which saves
    its output) the recomputation runs the whole call, and reentrant always does: then both move
    them twice, nn's as bn_cuda's."""
    ref, plain = pair(device)
    _, checkpointed = pair(device)
    x = batches(1, (3, 4, 3, 3), device)[0]
    weights = torch.linspace(-1, 1, x.numel(), device=device).view_as(x)

    def layer(module):
        return nn.Sequential(module, nn.ReLU()) if then_relu else module

    grads = []
    for module, checkpoint in ((plain, False), (checkpointed, True)):
        xi = x.clone().requires_grad_()
        f = layer(module)
        y = torch.utils.checkpoint.checkpoint(f, xi, use_reentrant=use_reentrant) if checkpoint else f(xi)
        (y * weights).sum().backward()
        grads.append((xi.grad, module.weight.grad, module.bias.grad))
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected)
    if use_reentrant or then_relu:
        xi = x.clone().requires_grad_()
        (torch.utils.checkpoint.checkpoint(layer(ref), xi, use_reentrant=use_reentrant) * weights).sum().backward()
        assert int(ref.num_batches_tracked) == 2
        assert_same_state(checkpointed, ref)
    else:
        assert int(checkpointed.num_batches_tracked) == 1
        assert_same_state(checkpointed, plain)
