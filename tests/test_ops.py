"""The torch.ops.bn_cuda operators called directly: opcheck, values against float64 references,
output_mask, running-stat updates, argument checks (TESTPLAN 12, 27) and Chan merging (TESTPLAN 34)."""

import itertools
import math

import pytest
import torch
from conftest import DEVICES, reference_batch_norm

import bn_cuda  # noqa: F401  (registers torch.ops.bn_cuda)

ops = torch.ops.bn_cuda
SHAPE = (3, 5, 4, 3)  # N, C, H, W: C not a power of two, odd spatial size
C = SHAPE[1]
COUNT = SHAPE[0] * SHAPE[2] * SHAPE[3]
DIMS = [0, 2, 3]
CH = (1, C, 1, 1)
OPCHECK_DTYPES = [torch.float32, torch.float64, torch.float16]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def param_dtype(dtype):
    # Parameters of half/bfloat16 input are float32, as PyTorch models keep them.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tol(dtype):
    """Tolerance of a value rounded once to dtype (O(1) magnitudes); defaults for float32/64."""
    if dtype == torch.float16:
        return {"rtol": 2e-3, "atol": 2e-3}
    if dtype == torch.bfloat16:
        return {"rtol": 1.6e-2, "atol": 1.6e-2}
    return {}


def make_input(device, dtype, channels_last=False, shape=SHAPE, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(dtype)
    x = x.to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def make_vec(device, dtype, kind, requires_grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "positive":
        v = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    else:
        v = torch.randn(C, generator=g, dtype=torch.float64)
    return v.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def affine_params(device, dtype, affine, requires_grad=False):
    if not affine:
        return None, None
    pd = param_dtype(dtype)
    return (
        make_vec(device, pd, "positive", requires_grad, seed=2),
        make_vec(device, pd, "normal", requires_grad, seed=3),
    )


def batch_stats(x):
    """(mean, invstd, var) of x in acc dtype, computed in float64."""
    var, mean = torch.var_mean(x.detach().double(), DIMS, correction=0)
    a = acc(x.dtype)
    return mean.to(a), torch.rsqrt(var + 1e-5).to(a), var.to(a)


def expand(v):
    return v.double().reshape(CH)


# ---- opcheck (TESTPLAN 27) ----------------------------------------------------------------------


def opcheck_samples(name, device, dtype, channels_last, requires_grad):
    """(op, args) pairs for one op: with and without weight/bias."""
    x = make_input(device, dtype, channels_last, requires_grad=requires_grad)
    dy = make_input(device, dtype, channels_last, seed=5)
    mean, invstd, var = batch_stats(x)
    samples = []
    for affine in (True, False):
        w, b = affine_params(device, dtype, affine, requires_grad)
        wd = None if w is None else w.detach()
        if name == "stats":
            samples.append((x,))
        elif name == "normalize":
            m = mean.clone().requires_grad_(requires_grad)
            s = invstd.clone().requires_grad_(requires_grad)
            samples.append((x, m, s, w, b))
        elif name == "forward_train":
            samples.append((x, w, b, 1e-5))
        elif name == "forward_eval":
            rm = make_vec(device, param_dtype(dtype), "normal", seed=7)
            rv = make_vec(device, param_dtype(dtype), "positive", seed=8)
            samples.append((x, rm, rv, w, b, 1e-5))
        elif name == "backward_reduce":
            samples.append((dy, x, mean))
        elif name == "backward_elemt":
            mean_dy = make_vec(device, acc(dtype), "normal", seed=9)
            mean_dy_xmu = make_vec(device, acc(dtype), "normal", seed=10)
            samples.append((dy, x, mean, invstd, wd, mean_dy, mean_dy_xmu))
        elif name == "backward":
            for training in (True, False):
                samples.append((dy, x, mean, invstd, wd, training, [True, True, True]))
            samples.append((dy, x, mean, invstd, wd, True, [True, False, True]))
        elif name == "update_running_stats":
            pd = param_dtype(dtype)
            rm = make_vec(device, pd, "normal", seed=11)
            rv = make_vec(device, pd, "positive", seed=12)
            nbt = torch.tensor(3, dtype=torch.long, device=device)
            samples.append((rm, rv, mean, var, COUNT, 0.1, None))
            samples.append((rm.clone(), rv.clone(), mean, var, COUNT, None, nbt))
            count_tensor = torch.tensor([float(COUNT)], dtype=torch.float64, device=device)
            samples.append((rm.clone(), rv.clone(), mean, var, 0, 0.1, None, count_tensor))
    return samples


DIFFERENTIABLE_OPS = ["stats", "normalize", "forward_train", "forward_eval"]
OTHER_OPS = ["backward_reduce", "backward_elemt", "backward", "update_running_stats"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("name", "requires_grad"),
    [(n, True) for n in DIFFERENTIABLE_OPS] + [(n, False) for n in DIFFERENTIABLE_OPS + OTHER_OPS],
)
def test_opcheck(name, requires_grad, dtype, channels_last, device):
    op = getattr(ops, name).default
    for args in opcheck_samples(name, device, dtype, channels_last, requires_grad):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", DIFFERENTIABLE_OPS + OTHER_OPS)
def test_opcheck_bfloat16(name, device):
    op = getattr(ops, name).default
    for args in opcheck_samples(name, device, torch.bfloat16, True, name in DIFFERENTIABLE_OPS):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_half_input_half_params(device):
    x = make_input(device, torch.float16, requires_grad=True)
    w = make_vec(device, torch.float16, "positive", requires_grad=True)
    b = make_vec(device, torch.float16, "normal", requires_grad=True)
    torch.library.opcheck(ops.forward_train.default, (x, w, b, 1e-5))
    mean, invstd, _ = batch_stats(x)
    dy = make_input(device, torch.float16, seed=5)
    torch.library.opcheck(ops.backward.default, (dy, x.detach(), mean, invstd, w.detach(), True, [True, True, True]))


# ---- values against float64 references ----------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats(dtype, channels_last, device):
    x = make_input(device, dtype, channels_last)
    mean, var = ops.stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), DIMS, correction=0)
    # float64 whatever the input: the exchange format of cross-device merges (csrc/ops.cpp).
    assert mean.dtype == var.dtype == torch.float64
    assert mean.shape == var.shape == (C,)
    assert mean.device == x.device
    # Accumulation is in acc(dtype), so compare at that precision.
    torch.testing.assert_close(mean.to(acc(dtype)), ref_mean.to(acc(dtype)))
    torch.testing.assert_close(var.to(acc(dtype)), ref_var.to(acc(dtype)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (2, 3, 2, 3, 4)], ids=str)
def test_stats_other_ranks(shape, device):
    x = make_input(device, torch.float32, shape=shape)
    mean, var = ops.stats(x)
    dims = [0, *range(2, x.dim())]
    ref_var, ref_mean = torch.var_mean(x.double(), dims, correction=0)
    torch.testing.assert_close(mean.float(), ref_mean.float())
    torch.testing.assert_close(var.float(), ref_var.float())


@pytest.mark.parametrize("device", DEVICES)
def test_stats_empty_batch_is_zero(device):
    mean, var = ops.stats(torch.empty(0, 4, 3, 3, device=device))
    torch.testing.assert_close(mean, torch.zeros(4, device=device, dtype=torch.float64))
    torch.testing.assert_close(var, torch.zeros(4, device=device, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize(dtype, affine, channels_last, device):
    x = make_input(device, dtype, channels_last)
    mean = make_vec(device, acc(dtype), "normal", seed=20)
    invstd = make_vec(device, acc(dtype), "positive", seed=21)
    w, b = affine_params(device, dtype, affine)
    y = ops.normalize(x, mean, invstd, w, b)
    ref = (x.double() - expand(mean)) * expand(invstd)
    if affine:
        ref = ref * expand(w) + expand(b)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, ref.to(dtype), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_train(dtype, affine, channels_last, device):
    x = make_input(device, dtype, channels_last)
    w, b = affine_params(device, dtype, affine)
    eps = 1e-3
    y, mean, invstd, var = ops.forward_train(x, w, b, eps)
    ref_y, ref_mean, ref_var = reference_batch_norm(x, w, b, eps=eps, training=True)
    a = acc(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == invstd.dtype == var.dtype == a
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, ref_y.to(dtype), **tol(dtype))
    torch.testing.assert_close(mean, ref_mean.to(a))
    torch.testing.assert_close(var, ref_var.to(a))
    torch.testing.assert_close(invstd, torch.rsqrt(ref_var + eps).to(a))


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_eval(dtype, affine, channels_last, device):
    x = make_input(device, dtype, channels_last)
    w, b = affine_params(device, dtype, affine)
    rm = make_vec(device, param_dtype(dtype), "normal", seed=30)
    rv = make_vec(device, param_dtype(dtype), "positive", seed=31)
    y = ops.forward_eval(x, rm, rv, w, b, 1e-2)
    ref, _, _ = reference_batch_norm(x, w, b, eps=1e-2, training=False, running_mean=rm, running_var=rv)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, ref.to(dtype), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_eval_eps_zero(device):
    x = make_input(device, torch.float64)
    rm = make_vec(device, torch.float64, "normal")
    rv = make_vec(device, torch.float64, "positive")
    y = ops.forward_eval(x, rm, rv, None, None, 0.0)
    torch.testing.assert_close(y, (x - expand(rm)) / expand(rv).sqrt())


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_reduce(dtype, channels_last, device):
    x = make_input(device, dtype, channels_last)
    dy = make_input(device, dtype, channels_last, seed=4)
    mean = make_vec(device, acc(dtype), "normal", seed=5)
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
    dy64 = dy.double()
    assert sum_dy.dtype == sum_dy_xmu.dtype == acc(dtype)
    torch.testing.assert_close(sum_dy, dy64.sum(DIMS).to(acc(dtype)))
    torch.testing.assert_close(sum_dy_xmu, (dy64 * (x.double() - expand(mean))).sum(DIMS).to(acc(dtype)))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_reduce_grad_in_other_layout(device):
    x = make_input(device, torch.float64)
    dy = make_input(device, torch.float64, channels_last=True, seed=4)
    mean = make_vec(device, torch.float64, "normal")
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
    torch.testing.assert_close(sum_dy, dy.sum(DIMS))
    torch.testing.assert_close(sum_dy_xmu, (dy * (x - expand(mean))).sum(DIMS))


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_elemt(dtype, affine, channels_last, device):
    x = make_input(device, dtype, channels_last)
    dy = make_input(device, dtype, channels_last, seed=4)
    a = acc(dtype)
    mean = make_vec(device, a, "normal", seed=40)
    invstd = make_vec(device, a, "positive", seed=41)
    mean_dy = make_vec(device, a, "normal", seed=42)
    mean_dy_xmu = make_vec(device, a, "normal", seed=43)
    w, _ = affine_params(device, dtype, affine)
    dx = ops.backward_elemt(dy, x, mean, invstd, w, mean_dy, mean_dy_xmu)
    xmu = x.double() - expand(mean)
    ref = (dy.double() - expand(mean_dy) - xmu * expand(invstd) ** 2 * expand(mean_dy_xmu)) * expand(invstd)
    if affine:
        ref = ref * expand(w)
    assert dx.dtype == dtype
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(dx, ref.to(dtype), **tol(dtype))


def reference_grads(x, dy, w, b, training, running_mean=None, running_var=None, eps=1e-5):
    """(dx, dw, db) by float64 autograd of the reference batch norm (dw, db with unit params
    when w is None)."""
    x64 = x.detach().double().requires_grad_()
    w64 = (
        w.detach().double() if w is not None else torch.ones(C, dtype=torch.float64, device=x.device)
    ).requires_grad_()
    b64 = (
        b.detach().double() if b is not None else torch.zeros(C, dtype=torch.float64, device=x.device)
    ).requires_grad_()
    y, _, _ = reference_batch_norm(x64, w64, b64, eps, training, running_mean, running_var)
    return torch.autograd.grad(y, (x64, w64, b64), dy.double())


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(dtype, affine, training, channels_last, device):
    x = make_input(device, dtype, channels_last)
    dy = make_input(device, dtype, channels_last, seed=4)
    w, b = affine_params(device, dtype, affine)
    a = acc(dtype)
    if training:
        mean, invstd, _ = batch_stats(x)
        rm = rv = None
    else:
        rm = make_vec(device, a, "normal", seed=50)
        rv = make_vec(device, a, "positive", seed=51)
        mean, invstd = rm, torch.rsqrt(rv.double() + 1e-5).to(a)
    dx, dw, db = ops.backward(dy, x, mean, invstd, w, training, [True, True, True])
    ref_dx, ref_dw, ref_db = reference_grads(x, dy, w, b, training, rm, rv)
    pd = w.dtype if affine else a
    assert dx.dtype == dtype and dw.dtype == pd and db.dtype == pd
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(dx, ref_dx.to(dtype), **tol(dtype))
    torch.testing.assert_close(dw, ref_dw.to(pd))
    torch.testing.assert_close(db, ref_db.to(pd))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)), ids=str)
def test_backward_output_mask(mask, training, device):
    x = make_input(device, torch.float64)
    dy = make_input(device, torch.float64, seed=4)
    w, _ = affine_params(device, torch.float64, True)
    mean, invstd, _ = batch_stats(x)
    full = ops.backward(dy, x, mean, invstd, w, training, [True, True, True])
    part = ops.backward(dy, x, mean, invstd, w, training, list(mask))
    for wanted, got, expected in zip(mask, part, full, strict=True):
        if wanted:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:
            assert got.shape == (0,)
            assert got.device == x.device


# ---- update_running_stats -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0, -0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_running_stats_momentum(dtype, momentum, device):
    rm = make_vec(device, dtype, "normal", seed=60)
    rv = make_vec(device, dtype, "positive", seed=61)
    mean = make_vec(device, dtype, "normal", seed=62)
    var = make_vec(device, dtype, "positive", seed=63)
    rm0, rv0 = rm.clone(), rv.clone()
    ops.update_running_stats(rm, rv, mean, var, 10, momentum, None)
    torch.testing.assert_close(rm, (1 - momentum) * rm0 + momentum * mean)
    torch.testing.assert_close(rv, (1 - momentum) * rv0 + momentum * var * 10 / 9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", [0, 1, 2, 9])
def test_update_running_stats_count_tensor(count, momentum, device):
    """A count known only on the device (count_tensor) gives what the int count gives; 0 keeps
    the buffers bitwise, 1 makes running_var non-finite instead of raising (no host read to raise
    on; a single value's variance is 0, so NaN in practice)."""
    mean = make_vec(device, torch.float32, "normal", seed=80)
    var = make_vec(device, torch.float32, "positive", seed=81)
    nbt = torch.tensor(4, device=device) if momentum is None else None
    rm = make_vec(device, torch.float32, "normal", seed=82)
    rv = make_vec(device, torch.float32, "positive", seed=83)
    rm0, rv0 = rm.clone(), rv.clone()
    count_tensor = torch.tensor([float(count)], dtype=torch.float64, device=device)
    ops.update_running_stats(rm, rv, mean, var, 0, momentum, nbt, count_tensor)
    if count == 0:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    elif count == 1:
        assert not rv.isfinite().any()
    else:
        rm_int, rv_int = rm0.clone(), rv0.clone()
        ops.update_running_stats(rm_int, rv_int, mean, var, count, momentum, nbt)
        torch.testing.assert_close(rm, rm_int)
        torch.testing.assert_close(rv, rv_int)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tracked", [1, 2, 7])
def test_update_running_stats_cumulative(tracked, device):
    rm = make_vec(device, torch.float32, "normal", seed=70)
    rv = make_vec(device, torch.float32, "positive", seed=71)
    mean = make_vec(device, torch.float32, "normal", seed=72)
    var = make_vec(device, torch.float32, "positive", seed=73)
    nbt = torch.tensor(tracked, device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    ops.update_running_stats(rm, rv, mean, var, 5, None, nbt)
    f = 1.0 / tracked
    torch.testing.assert_close(rm, (1 - f) * rm0 + f * mean)
    torch.testing.assert_close(rv, (1 - f) * rv0 + f * var * 5 / 4)
    assert nbt.item() == tracked  # the counter is read, not incremented


@pytest.mark.parametrize("device", DEVICES)
def test_update_running_stats_cumulative_equals_average(device):
    """momentum=None over k batches from zero state gives the plain average of the batches."""
    rm = torch.zeros(C, device=device, dtype=torch.float64)
    rv = torch.zeros(C, device=device, dtype=torch.float64)
    nbt = torch.tensor(0, device=device)
    means, vars_ = [], []
    for i in range(4):
        x = make_input(device, torch.float64, seed=80 + i)
        mean, var = ops.stats(x)
        nbt += 1
        ops.update_running_stats(rm, rv, mean, var, COUNT, None, nbt)
        means.append(mean)
        vars_.append(var * COUNT / (COUNT - 1))
    torch.testing.assert_close(rm, torch.stack(means).mean(0))
    torch.testing.assert_close(rv, torch.stack(vars_).mean(0))


@pytest.mark.parametrize("device", DEVICES)
def test_update_running_stats_from_float32_stats_into_half_buffers(device):
    rm = torch.zeros(C, device=device, dtype=torch.float16)
    rv = torch.ones(C, device=device, dtype=torch.float16)
    mean = make_vec(device, torch.float32, "normal", seed=90)
    var = make_vec(device, torch.float32, "positive", seed=91)
    ops.update_running_stats(rm, rv, mean, var, 3, 0.5, None)
    assert rm.dtype == rv.dtype == torch.float16
    torch.testing.assert_close(rm, (0.5 * mean).half(), **tol(torch.float16))
    torch.testing.assert_close(rv, (0.5 + 0.5 * var * 1.5).half(), **tol(torch.float16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_count_zero_unchanged(momentum, device):
    rm = make_vec(device, torch.float32, "normal")
    rv = make_vec(device, torch.float32, "positive")
    rm0, rv0 = rm.clone(), rv.clone()
    zeros = torch.zeros(C, device=device)
    ops.update_running_stats(rm, rv, zeros, zeros, 0, momentum, torch.tensor(1, device=device))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ---- wrong calls raise (TESTPLAN 12) -----------------------------------------------------------


def _wrong_calls(device):
    """(name, call, exception type, message regex) for calls that must be refused."""
    x = torch.randn(2, 3, 4, 4, device=device)
    dy = torch.randn_like(x)
    v3 = torch.ones(3, device=device)
    v4 = torch.ones(4, device=device)
    meta3 = torch.ones(3, device="meta")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    mask = [True, True, True]
    ints = torch.ones(2, 3, 4, dtype=torch.long, device=device)
    return [
        ("forward_train weight length", lambda: ops.forward_train(x, v4, None, 1e-5), RuntimeError, "weight.*3.*4"),
        ("forward_train bias length", lambda: ops.forward_train(x, None, v4, 1e-5), RuntimeError, "bias.*3.*4"),
        ("forward_train 1-D", lambda: ops.forward_train(x[0, 0, 0], None, None, 1e-5), RuntimeError, "2 dims"),
        ("forward_train 0-D", lambda: ops.forward_train(x[0, 0, 0, 0], None, None, 1e-5), RuntimeError, "2 dims"),
        (
            "forward_train 0 channels",
            lambda: ops.forward_train(x[:, :0], None, None, 1e-5),
            RuntimeError,
            "channel",
        ),
        ("forward_train integer", lambda: ops.forward_train(ints, None, None, 1e-5), NotImplementedError, "Long"),
        (
            "forward_train bool",
            lambda: ops.forward_train(ints.bool(), None, None, 1e-5),
            NotImplementedError,
            "Bool",
        ),
        ("forward_train eps 0", lambda: ops.forward_train(x, None, None, 0.0), RuntimeError, "eps"),
        ("forward_train eps < 0", lambda: ops.forward_train(x, None, None, -1.0), RuntimeError, "eps"),
        (
            "forward_train integer weight",
            lambda: ops.forward_train(x, v3.long(), None, 1e-5),
            RuntimeError,
            "weight.*floating",
        ),
        ("forward_train meta weight", lambda: ops.forward_train(x, meta3, None, 1e-5), RuntimeError, "meta"),
        ("forward_eval eps < 0", lambda: ops.forward_eval(x, rm, rv, None, None, -1.0), RuntimeError, "eps"),
        (
            "forward_eval running_mean length",
            lambda: ops.forward_eval(x, v4, rv, None, None, 1e-5),
            RuntimeError,
            "running_mean.*3.*4",
        ),
        (
            "forward_eval running_var length",
            lambda: ops.forward_eval(x, rm, v4, None, None, 1e-5),
            RuntimeError,
            "running_var.*3.*4",
        ),
        (
            "forward_eval meta running_mean",
            lambda: ops.forward_eval(x, meta3, rv, None, None, 1e-5),
            RuntimeError,
            "meta",
        ),
        ("stats 1-D", lambda: ops.stats(x[0, 0, 0]), RuntimeError, "2 dims"),
        ("stats integer", lambda: ops.stats(ints.int()), NotImplementedError, "Int"),
        ("normalize mean length", lambda: ops.normalize(x, v4, v3, None, None), RuntimeError, "mean.*3.*4"),
        ("normalize invstd length", lambda: ops.normalize(x, v3, v4, None, None), RuntimeError, "invstd.*3.*4"),
        ("normalize weight length", lambda: ops.normalize(x, v3, v3, v4, None), RuntimeError, "weight.*3.*4"),
        ("normalize meta mean", lambda: ops.normalize(x, meta3, v3, None, None), RuntimeError, "meta"),
        (
            "backward_reduce grad_output shape",
            lambda: ops.backward_reduce(dy[..., :3], x, rm),
            RuntimeError,
            "grad_output.*size",
        ),
        (
            "backward_reduce grad_output dtype",
            lambda: ops.backward_reduce(dy.double(), x, rm),
            RuntimeError,
            "grad_output.*dtype",
        ),
        (
            "backward_reduce meta grad_output",
            lambda: ops.backward_reduce(dy.to("meta"), x, rm),
            RuntimeError,
            "meta",
        ),
        ("backward_reduce mean length", lambda: ops.backward_reduce(dy, x, v4), RuntimeError, "mean.*3.*4"),
        (
            "backward_elemt grad_output shape",
            lambda: ops.backward_elemt(dy[0], x, rm, rv, None, rm, rm),
            RuntimeError,
            "grad_output.*size",
        ),
        (
            "backward_elemt mean_dy length",
            lambda: ops.backward_elemt(dy, x, rm, rv, None, v4, rm),
            RuntimeError,
            "mean_dy.*3.*4",
        ),
        (
            "backward_elemt mean_dy_xmu length",
            lambda: ops.backward_elemt(dy, x, rm, rv, None, rm, v4),
            RuntimeError,
            "mean_dy_xmu.*3.*4",
        ),
        (
            "backward grad_output shape",
            lambda: ops.backward(dy[:1], x, rm, rv, v3, True, mask),
            RuntimeError,
            "grad_output.*size",
        ),
        (
            "backward grad_output dtype",
            lambda: ops.backward(dy.half(), x, rm, rv, v3, True, mask),
            RuntimeError,
            "grad_output.*dtype",
        ),
        ("backward weight length", lambda: ops.backward(dy, x, rm, rv, v4, True, mask), RuntimeError, "weight.*3.*4"),
        ("backward invstd length", lambda: ops.backward(dy, x, rm, v4, v3, True, mask), RuntimeError, "invstd.*3.*4"),
        ("backward mean length", lambda: ops.backward(dy, x, v4, rv, v3, False, mask), RuntimeError, "mean.*3.*4"),
        ("backward meta weight", lambda: ops.backward(dy, x, rm, rv, meta3, True, mask), RuntimeError, "meta"),
        (
            "backward 1-D",
            lambda: ops.backward(dy[0, 0, 0], x[0, 0, 0], rm, rv, v3, True, mask),
            RuntimeError,
            "2 dims",
        ),
    ]


_WRONG_CALL_NAMES = [case[0] for case in _wrong_calls("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _WRONG_CALL_NAMES)
def test_wrong_call_raises(case, device):
    _, call, exc, pattern = next(c for c in _wrong_calls(device) if c[0] == case)
    with pytest.raises(exc, match=pattern):
        call()


CUDA_ONLY = DEVICES[1:]


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cpu_tensors_with_cuda_input_raise(device):
    """Per-channel tensors or grad_output on the CPU with a CUDA input: a RuntimeError naming the
    devices, before any kernel runs."""
    x = torch.randn(2, 3, 4, 4, device=device)
    dy = torch.randn_like(x)
    cpu3 = torch.ones(3)
    v = torch.ones(3, device=device)
    mask = [True, True, True]
    calls = [
        lambda: ops.forward_train(x, cpu3, None, 1e-5),
        lambda: ops.forward_train(x, None, cpu3, 1e-5),
        lambda: ops.forward_eval(x, cpu3, v, None, None, 1e-5),
        lambda: ops.forward_eval(x, v, cpu3, None, None, 1e-5),
        lambda: ops.normalize(x, cpu3, v, None, None),
        lambda: ops.backward_reduce(dy.cpu(), x, v),
        lambda: ops.backward_reduce(dy, x, cpu3),
        lambda: ops.backward_elemt(dy, x, v, v, None, cpu3, v),
        lambda: ops.backward(dy, x, v, v, cpu3, True, mask),
        lambda: ops.backward(dy, x, cpu3, v, v, False, mask),
        lambda: ops.update_running_stats(cpu3.clone(), v.clone(), v, v, 4, 0.1, None),
        lambda: ops.update_running_stats(v.clone(), v.clone(), v, v, 4, None, torch.tensor(1)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"cpu|device"):
            call()


def _wrong_updates(device):
    """(name, kwargs overrides, message regex) for update_running_stats."""
    return [
        ("count 1", {"count": 1}, "count 1|more than 1"),
        ("negative count", {"count": -2}, "count"),
        ("running_mean length", {"running_mean": torch.zeros(4, device=device)}, "running_mean.*3.*4"),
        ("running_var length", {"running_var": torch.ones(2, device=device)}, "running_var.*3.*2"),
        ("var length", {"var": torch.ones(2, device=device)}, "var"),
        ("integer running_mean", {"running_mean": torch.zeros(3, dtype=torch.long, device=device)}, "floating"),
        ("momentum None without counter", {"momentum": None}, "num_batches_tracked"),
        (
            "two-element counter",
            {"momentum": None, "num_batches_tracked": torch.tensor([1, 2], device=device)},
            "num_batches_tracked.*got 2 element",
        ),
        ("meta running_mean", {"running_mean": torch.zeros(3, device="meta")}, "meta"),
        (
            "meta counter",
            {"momentum": None, "num_batches_tracked": torch.tensor(1, device="meta")},
            "num_batches_tracked.*meta",
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c[0] for c in _wrong_updates("cpu")])
def test_update_running_stats_wrong_call_raises_and_changes_nothing(case, device):
    _, overrides, pattern = next(c for c in _wrong_updates(device) if c[0] == case)
    args = {
        "running_mean": torch.zeros(3, device=device),
        "running_var": torch.ones(3, device=device),
        "mean": torch.full((3,), 2.0, device=device),
        "var": torch.full((3,), 3.0, device=device),
        "count": 4,
        "momentum": 0.5,
        "num_batches_tracked": None,
    }
    args.update(overrides)
    before = [t.clone() for t in (args["running_mean"], args["running_var"])]
    with pytest.raises(RuntimeError, match=pattern):
        ops.update_running_stats(**args)
    for t, b in zip((args["running_mean"], args["running_var"]), before, strict=True):
        if t.device.type != "meta":
            assert torch.equal(t, b)


# ---- Chan merge over uneven splits (TESTPLAN 34) -----------------------------------------------


def chan_merge(a, b):
    """Chan et al.'s merge of (count, mean, m2) states, in Python floats (float64)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n == 0:
        return a
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


CHUNK_SPLITS = [[0, 1, 7, 0, 2, 50, 1, 3], [1, 1, 1, 61], [64, 0], [13, 17, 19, 15]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nc", "channels_last"])
@pytest.mark.parametrize("sizes", CHUNK_SPLITS, ids=str)
def test_chan_merge_of_chunk_stats(sizes, layout, dtype, device):
    """Per-chunk (count, mean, M2 = var * count) from ops.stats, merged with Chan's formula in
    float64, equal the full-batch statistics at mean 1e4 / std 1e-2 (what SyncBatchNorm does
    across ranks). Chunks of 0 and 1 samples included; with (N, C) input a 1-sample chunk has
    count 1."""
    shape = (sum(sizes), 3) if layout == "nc" else (sum(sizes), 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    per_sample = x[0, 0].numel()
    dims = [0, *range(2, x.dim())]
    states = [(0, 0.0, 0.0)] * 3
    for chunk in torch.split(x, sizes):
        mean, var = ops.stats(chunk)
        count = chunk.shape[0] * per_sample
        for c in range(3):
            states[c] = chan_merge(states[c], (count, float(mean[c]), float(var[c]) * count))
    full_mean, full_var = ops.stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dims, correction=0)
    for c in range(3):
        n, mean, m2 = states[c]
        assert n == x.numel() // 3
        assert math.isclose(float(full_var[c]), float(ref_var[c]), rel_tol=2e-5)
        assert math.isclose(float(full_mean[c]), float(ref_mean[c]), rel_tol=2e-5)
        assert math.isclose(mean, float(ref_mean[c]), rel_tol=2e-5)
        assert math.isclose(m2 / n, float(ref_var[c]), rel_tol=2e-5), (c, m2 / n, float(ref_var[c]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_strides", ["odd", "channels_last", "contiguous"])
def test_opcheck_channels_last_with_odd_strides(device, grad_strides):
    """An HWC image permuted to 1xCxHxW is dense in channels_last with an odd stride on its size-1
    batch dim: the fake kernels give the outputs the layout the kernels write (on the CPU,
    channels_last for y, and for grad_input where grad_output is dense with that odd stride too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 10, 3, generator=g).permute(2, 0, 1)[None].to(device)
    dy = {
        "odd": torch.randn(12, 10, 3, generator=g).permute(2, 0, 1)[None],
        "channels_last": torch.randn(1, 3, 12, 10, generator=g).contiguous(memory_format=torch.channels_last),
        "contiguous": torch.randn(1, 3, 12, 10, generator=g),
    }[grad_strides].to(device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    samples = [
        (ops.forward_train.default, (x, w, b, 1e-5)),
        (ops.forward_eval.default, (x, mean, invstd, w, b, 1e-5)),
        (ops.normalize.default, (x, mean, invstd, w, b)),
        (ops.backward.default, (dy, x, mean, invstd, w, True, [True, True, True])),
        (ops.backward_elemt.default, (dy, x, mean, invstd, w, mean * 0.1, mean * 0.2)),
    ]
    for op, args in samples:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_empty_input_keeps_its_layout(device, memory_format):
    """An empty batch (a SyncBatchNorm rank with no samples) gives outputs laid out as the input,
    as empty_like keeps it (suggest_memory_format calls every empty tensor contiguous); the fake
    kernels agree (opcheck)."""
    x = torch.randn(0, 3, 4, 4, device=device).contiguous(memory_format=memory_format)
    w, b = torch.ones(3, device=device), torch.zeros(3, device=device)
    mean, invstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = ops.normalize(x, mean, invstd, w, b)
    dx = ops.backward(x, x, mean, invstd, w, True, [True, True, True])[0]
    assert y.stride() == dx.stride() == x.stride()
    for op, args in [
        (ops.normalize.default, (x, mean, invstd, w, b)),
        (ops.forward_train.default, (x, w, b, 1e-5)),
        (ops.backward.default, (x, x, mean, invstd, w, True, [True, True, True])),
    ]:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
