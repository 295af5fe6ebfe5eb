"""CUDA-only behaviour of the CUDA kernels (TESTPLAN 14, 20-25, 30-33): values against
nn.BatchNorm2d on the same GPU and against a float64 reference over dtypes x memory formats x
awkward shapes, unaligned data, empty inputs, output_mask, NaN isolation, large means, bitwise
determinism, the current stream, CUDA graph capture, CPU/CUDA agreement and more than 2^31
elements.

Tests named ``test_small_*`` use small shapes only: scripts/gpu_check.sh runs them under
compute-sanitizer (``-k small``), so every kernel path (vectorized and scalar, NCHW and
channels-last, one block per channel and split channels with their merge kernel, more channels
than a grid dimension holds) is among them.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_batch_norm

import bn_cuda

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

ops = torch.ops.bn_cuda
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-5

# (N, C, H, W). Together they take every kernel path; see the comments.
SMALL_SHAPES = [
    (2, 3, 4, 5),  # C = 3; H*W = 20 (float32 packs of 4, scalar for half)
    (4, 33, 5, 7),  # C not a multiple of 4 or 32, odd H*W
    (1, 1, 1, 2),  # N*H*W = 2, C = 1 (one value pair per channel)
    (3, 5, 1, 1),  # N*H*W = 3 with H*W = 1: the rows (channels-last) kernels in both formats
    (1, 6, 1, 3),  # N*H*W = 3 with H*W = 3
    (2, 1, 3, 3),  # C = 1
    (8, 16, 8, 8),  # packs of 16 bytes in both formats
    (16, 4, 32, 32),  # few channels, many values: channels-last split over blocks + the merge kernel
]
# NCHW channels split over blocks need more values per channel: see test_small_split_channels.

# Error allowed on top of twice PyTorch's own error, relative to the magnitude of the values.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def shape_id(shape):
    return "x".join(str(s) for s in shape)


def param_dtype(dtype):
    """Parameters of float16/bfloat16 models are float32, as PyTorch keeps them."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def make_x(shape, dtype, channels_last=False, seed=0, mean=0.5, std=1.5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float64) * std + mean).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_affine(channels, dtype, seed=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.rand(channels, generator=g, device="cuda", dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(channels, generator=g, device="cuda", dtype=torch.float64).to(dtype)
    return weight, bias


def unaligned_copy(x):
    """A copy of x with x's strides whose data starts one element past a 16-byte boundary, so the
    kernels must take their scalar (unvectorized) path."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = storage[1:].as_strided(x.shape, x.stride())
    y.copy_(x)
    assert y.data_ptr() % 16 != 0
    return y


def unambiguous(shape):
    """Whether channels_last and contiguous strides differ for this shape."""
    return shape[1] > 1 and shape[2] * shape[3] > 1


def max_error(actual, expected):
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_as_accurate(actual, torch_actual, expected, dtype, what):
    """bn_cuda's result is at most twice as far from the float64 `expected` as PyTorch's result in
    the same dtype, plus ATOL[dtype] scaled by the size of the values. NaN fails."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = 1.0 + (expected.double().abs().max().item() if expected.numel() else 0.0)
    err = max_error(actual, expected)
    torch_err = max_error(torch_actual, expected)
    bound = 2 * torch_err + ATOL[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (PyTorch's error {torch_err:.3g})"


def reference_grads(x, weight, bias, dy, training, running_mean=None, running_var=None):
    """float64 (y, dx, dweight, dbias) of batch norm by autograd through the definition."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y64, _, _ = reference_batch_norm(x64, w64, b64, EPS, training, running_mean, running_var)
    y64.backward(dy.double())
    return y64.detach(), x64.grad, w64.grad, b64.grad


def module_step(module, x, dy):
    """(y, x.grad) of module(x) with gradient dy; x is cloned into a fresh leaf."""
    xr = x.detach().clone().requires_grad_()
    y = module(xr)
    y.backward(dy)
    return y.detach(), xr.grad


def reference_ops_backward(x, dy, weight, mean, invstd, training):
    """float64 (dx, dweight, dbias) from given statistics, mirroring ops.backward."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    x64, dy64 = x.double(), dy.double()
    istd = invstd.double().view(shape)
    xhat = (x64 - mean.double().view(shape)) * istd
    w = weight.double().view(shape)
    db = dy64.sum(dims)
    dw = (dy64 * xhat).sum(dims)
    if training:
        count = x.numel() // x.shape[1]
        dx = (dy64 - db.view(shape) / count - xhat * dw.view(shape) / count) * istd * w
    else:
        dx = dy64 * istd * w
    return dx, dw, db


# ---- values against PyTorch on the GPU and float64 (TESTPLAN 14, 24) --------------------------------------


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_train_matches_torch_and_float64(dtype, channels_last, shape):
    channels = shape[1]
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1, mean=0.0, std=1.0)
    ours = bn_cuda.BatchNorm2d(channels, device="cuda", dtype=param_dtype(dtype))
    theirs = torch.nn.BatchNorm2d(channels, device="cuda", dtype=param_dtype(dtype))
    weight, bias = make_affine(channels, param_dtype(dtype))
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)
    theirs.load_state_dict(ours.state_dict())

    y, dx = module_step(ours, x, dy)
    y_t, dx_t = module_step(theirs, x, dy)
    y_ref, dx_ref, dw_ref, db_ref = reference_grads(x, weight, bias, dy, training=True)

    assert y.dtype == dtype and dx.dtype == dtype
    assert ours.weight.grad.dtype == param_dtype(dtype)
    assert_as_accurate(y, y_t, y_ref, dtype, "output")
    assert_as_accurate(dx, dx_t, dx_ref, dtype, "grad_input")
    assert_as_accurate(ours.weight.grad, theirs.weight.grad, dw_ref, dtype, "grad_weight")
    assert_as_accurate(ours.bias.grad, theirs.bias.grad, db_ref, dtype, "grad_bias")
    # Running statistics (momentum 0.1 from mean 0, var 1; unbiased variance) in the parameter dtype.
    _, mean64, var64 = reference_batch_norm(x)
    count = x.numel() // channels
    rm_ref = 0.1 * mean64
    rv_ref = 0.9 + 0.1 * var64 * count / (count - 1)
    assert_as_accurate(ours.running_mean, theirs.running_mean, rm_ref, param_dtype(dtype), "running_mean")
    assert_as_accurate(ours.running_var, theirs.running_var, rv_ref, param_dtype(dtype), "running_var")
    if channels_last and unambiguous(shape):
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_eval_matches_torch_and_float64(dtype, channels_last, shape):
    channels = shape[1]
    pdtype = param_dtype(dtype)
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1, mean=0.0, std=1.0)
    g = torch.Generator(device="cuda").manual_seed(5)
    running_mean = (0.3 * torch.randn(channels, generator=g, device="cuda", dtype=torch.float64)).to(pdtype)
    running_var = (torch.rand(channels, generator=g, device="cuda", dtype=torch.float64) + 0.5).to(pdtype)
    weight, bias = make_affine(channels, pdtype)

    def run(batch_norm):
        xr = x.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        b = bias.detach().clone().requires_grad_()
        y = batch_norm(xr, running_mean, running_var, w, b, training=False, eps=EPS)
        y.backward(dy)
        return y.detach(), xr.grad, w.grad, b.grad

    ours = run(bn_cuda.functional.batch_norm)
    theirs = run(F.batch_norm)
    ref = reference_grads(x, weight, bias, dy, False, running_mean, running_var)
    for name, a, t, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, theirs, ref, strict=True):
        assert_as_accurate(a, t, r, dtype, name)
    if channels_last and unambiguous(shape):
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_unaligned_input(dtype, channels_last):
    """Data starting one element past a 16-byte boundary (TESTPLAN 14): the scalar paths give the
    float64 reference's values, like the vectorized paths on an aligned copy."""
    shape = (4, 8, 4, 8)  # H*W = 32 and C = 8: vectorizable when aligned, in both formats
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1, mean=0.0, std=1.0)
    weight, bias = make_affine(shape[1], param_dtype(dtype))
    xu, dyu = unaligned_copy(x), unaligned_copy(dy)

    y_a, mean_a, invstd_a, var_a = ops.forward_train(x, weight, bias, EPS)
    y_u, mean_u, invstd_u, var_u = ops.forward_train(xu, weight, bias, EPS)
    grads_a = ops.backward(dy, x, mean_a, invstd_a, weight, True, [True, True, True])
    grads_u = ops.backward(dyu, xu, mean_u, invstd_u, weight, True, [True, True, True])
    y_e = ops.forward_eval(xu, mean_a, var_a, weight, bias, EPS)

    y_ref, mean64, var64 = reference_batch_norm(x, weight, bias, EPS)
    grads_ref = reference_grads(x, weight, bias, dy, training=True)[1:]
    for name, unaligned, aligned, ref in [
        ("output", y_u, y_a, y_ref),
        ("eval output", y_e, y_a, y_ref),
        ("mean", mean_u, mean_a, mean64),
        ("var", var_u, var_a, var64),
        *zip(("grad_input", "grad_weight", "grad_bias"), grads_u, grads_a, grads_ref, strict=True),
    ]:
        assert_as_accurate(unaligned, aligned, ref, dtype, name)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (0, 5, 1, 1)], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_small_empty_input(dtype, channels_last, shape):
    """No values: outputs shaped like the input, statistics 0 (ops.cpp), invstd = 1/sqrt(0 + eps),
    gradient sums 0, and nothing launched that could read out of bounds."""
    channels = shape[1]
    acc = torch.float32
    x = make_x(shape, dtype, channels_last)
    weight, bias = make_affine(channels, param_dtype(dtype))
    zeros = torch.zeros(channels, device="cuda", dtype=acc)

    mean, var = ops.stats(x)
    assert mean.dtype == var.dtype == torch.float64  # the exchange format, whatever the input
    assert torch.equal(mean, zeros.double()) and torch.equal(var, zeros.double())
    y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(mean, zeros) and torch.equal(var, zeros)
    torch.testing.assert_close(invstd, torch.full_like(zeros, EPS**-0.5))
    assert ops.forward_eval(x, zeros, zeros + 1, weight, bias, EPS).shape == x.shape
    assert ops.normalize(x, zeros, zeros + 1, weight, bias).shape == x.shape
    sum_dy, sum_dy_xmu = ops.backward_reduce(x, x, zeros)
    assert torch.equal(sum_dy, zeros) and torch.equal(sum_dy_xmu, zeros)
    assert ops.backward_elemt(x, x, zeros, zeros + 1, weight, zeros, zeros).shape == x.shape
    for training in (True, False):
        dx, dw, db = ops.backward(x, x, zeros, zeros + 1, weight, training, [True, True, True])
        assert dx.shape == x.shape
        assert torch.equal(dw, zeros) and torch.equal(db, zeros)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_small_backward_output_mask(dtype, affine, training):
    """Every output_mask: unwanted outputs are empty (0,) tensors of the dtype they would have had;
    wanted ones equal (bitwise) those of the full mask."""
    shape = (4, 6, 5, 5)
    x = make_x(shape, dtype)
    dy = make_x(shape, dtype, seed=1, mean=0.0, std=1.0)
    weight = make_affine(shape[1], param_dtype(dtype))[0] if affine else None
    _, mean, invstd, _ = ops.forward_train(x, weight, None, EPS)
    full = ops.backward(dy, x, mean, invstd, weight, training, [True, True, True])
    out_dtypes = (dtype, weight.dtype if affine else torch.float32, weight.dtype if affine else torch.float32)
    for mask in ([a, b, c] for a in (False, True) for b in (False, True) for c in (False, True)):
        got = ops.backward(dy, x, mean, invstd, weight, training, mask)
        for wanted, g, f, out_dtype in zip(mask, got, full, out_dtypes, strict=True):
            assert g.dtype == out_dtype
            if wanted:
                assert torch.equal(g, f), f"mask {mask}"
            else:
                assert g.shape == (0,), f"mask {mask}"
    # Eval mode: dx = dy * invstd * weight; training mode goes through the statistics.
    dx_ref, dw_ref, db_ref = reference_ops_backward(
        x, dy, weight if affine else torch.ones_like(mean), mean, invstd, training
    )
    tol = {"rtol": 1e-2 if dtype == torch.float16 else 1e-4, "atol": 1e-3}
    for name, g, r in zip(("grad_input", "grad_weight", "grad_bias"), full, (dx_ref, dw_ref, db_ref), strict=True):
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(2, 65537, 1, 2), (3, 65537, 1, 1)], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_small_many_channels(dtype, channels_last, shape):
    """C = 65537 with 2 or 3 values per channel (TESTPLAN 32): more channels than a grid's y
    dimension holds, so the kernels loop over channels."""
    channels = shape[1]
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1, mean=0.0, std=1.0)
    weight, bias = make_affine(channels, param_dtype(dtype))
    y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
    dx, dw, db = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    y_t = F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
    y_ref, mean64, var64 = reference_batch_norm(x, weight, bias, EPS)
    dx_ref, dw_ref, db_ref = reference_grads(x, weight, bias, dy, training=True)[1:]
    assert_as_accurate(y, y_t, y_ref, dtype, "output")
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-5)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.float16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    torch.testing.assert_close(dw.double(), dw_ref, **tol)
    torch.testing.assert_close(db.double(), db_ref, **tol)


@pytest.mark.parametrize("shape", [(70000, 4, 1, 1), (70000, 3, 1, 2)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_small_many_rows(dtype, shape):
    """N = 70000 > 65535 (TESTPLAN 32): no grid dimension may follow N."""
    channels = shape[1]
    x = make_x(shape, dtype)
    dy = make_x(shape, dtype, seed=1, mean=0.0, std=1.0)
    ours = bn_cuda.BatchNorm2d(channels, device="cuda", dtype=param_dtype(dtype))
    theirs = torch.nn.BatchNorm2d(channels, device="cuda", dtype=param_dtype(dtype))
    y, dx = module_step(ours, x, dy)
    y_t, dx_t = module_step(theirs, x, dy)
    y_ref, dx_ref, dw_ref, db_ref = reference_grads(x, ours.weight, ours.bias, dy, training=True)
    assert_as_accurate(y, y_t, y_ref, dtype, "output")
    assert_as_accurate(dx, dx_t, dx_ref, dtype, "grad_input")
    assert_as_accurate(ours.weight.grad, theirs.weight.grad, dw_ref, dtype, "grad_weight")
    assert_as_accurate(ours.bias.grad, theirs.bias.grad, db_ref, dtype, "grad_bias")


@pytest.mark.parametrize(
    "shape",
    [
        # NCHW: 2 to 5 blocks per channel in every dtype, vectorized; channels-last: 5 to 18 blocks
        # per channel with 16-byte packs (C = 8 is a multiple of every pack width).
        (16, 8, 48, 48),
        # 40 blocks per channel channels-last in float32/float16/bfloat16 (more than 32, so lanes of
        # merge_partials_kernel fold several partials before the warp tree); NCHW 5 to 20.
        (40, 2, 64, 64),
    ],
    ids=shape_id,
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_small_split_channels(dtype, channels_last, shape):
    """Channels shared by several blocks (per-block partials merged by a second kernel) in both
    memory orders; SMALL_SHAPES split only channels-last channels in float32 and float16, so without
    this the NCHW split path would not run under compute-sanitizer. The block counts above follow
    from launch_policy.h's work per thread; any GPU with 20 or more SMs has room for them."""
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1, mean=0.0, std=1.0)
    weight, bias = make_affine(shape[1], param_dtype(dtype))
    y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
    grads = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    stats_mean, stats_var = ops.stats(x)

    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y_t = F.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
    y_t.backward(dy)
    y_ref, mean64, var64 = reference_batch_norm(x, weight, bias, EPS)
    grads_ref = reference_grads(x, weight, bias, dy, training=True)[1:]
    assert_as_accurate(y, y_t.detach(), y_ref, dtype, "output")
    for name, g, g_t, g_ref in zip(
        ("grad_input", "grad_weight", "grad_bias"), grads, (xt.grad, wt.grad, bt.grad), grads_ref, strict=True
    ):
        assert_as_accurate(g, g_t, g_ref, dtype, name)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(mean.double(), mean64, **tol)
    torch.testing.assert_close(var.double(), var64, **tol)
    # stats runs the same reduction with float64 outputs: forward_train's values rounded to acc.
    assert stats_mean.dtype == stats_var.dtype == torch.float64
    assert torch.equal(stats_mean.to(mean.dtype), mean) and torch.equal(stats_var.to(var.dtype), var)


# ---- numerics (TESTPLAN 20-23) ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 4, 64, 64), (4, 256, 8, 8), (4096, 3, 1, 1)], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mean", [1e4, 1e5])
def test_large_mean_variance(mean, channels_last, shape):
    """float32 x = mean + N(0, 1e-2): variance within 1e-4 relative of float64 computed from the same
    float32 values, through split channels, one block per channel and the rows kernels."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (mean + 1e-2 * torch.randn(shape, generator=g, device="cuda", dtype=torch.float64)).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x[:, 0] = mean  # a constant channel: variance exactly 0
    _, mean64, var64 = reference_batch_norm(x)
    batch_mean, var = ops.stats(x)
    y, train_mean, _, train_var = ops.forward_train(x, None, None, EPS)
    assert var[0].item() == 0.0
    rel = ((var.double()[1:] - var64[1:]).abs() / var64[1:]).max().item()
    assert rel <= 1e-4, f"variance relative error {rel}"
    # stats gives float64 (pivot + shifted mean summed in double); forward_train the same values
    # rounded to float32.
    assert batch_mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(batch_mean, mean64, rtol=0, atol=1e-3 * 1e-2)
    assert torch.equal(train_var, var.float()) and torch.equal(train_mean, batch_mean.float())
    assert torch.isfinite(y).all()
    assert (y[:, 0] == 0).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("shape", [(16, 4, 32, 32), (8, 16, 8, 8), (64, 8, 1, 1)], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_small_nonfinite_poisons_only_its_channel(channels_last, shape, poison):
    """A NaN or Inf in channel 1 makes channel 1's statistics and outputs non-finite and leaves every
    other channel bitwise as it is without it (TESTPLAN 21)."""
    x = make_x(shape, torch.float32, channels_last)
    dy = make_x(shape, torch.float32, channels_last, seed=1)
    bad = x.clone()
    bad[shape[0] - 1, 1, shape[2] - 1, shape[3] - 1] = poison
    clean_out = ops.forward_train(x, None, None, EPS)
    bad_out = ops.forward_train(bad, None, None, EPS)
    clean_grads = ops.backward(dy, x, clean_out[1], clean_out[2], None, True, [True, True, True])
    bad_grads = ops.backward(dy, bad, bad_out[1], bad_out[2], None, True, [True, True, True])
    others = torch.tensor([c for c in range(shape[1]) if c != 1], device="cuda")
    assert not torch.isfinite(bad_out[2][1] * bad_out[3][1]).item()  # invstd * var of channel 1
    assert not torch.isfinite(bad_out[0][:, 1]).any()
    for clean, dirty in zip((*clean_out, *clean_grads), (*bad_out, *bad_grads), strict=True):
        channel_dim = 1 if clean.dim() == 4 else 0
        assert torch.equal(clean.index_select(channel_dim, others), dirty.index_select(channel_dim, others))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_small_float16_squares_overflow(channels_last):
    """float16 values near 300 (squares beyond 65504): float32 statistics, finite and accurate."""
    shape = (8, 4, 16, 16)
    x = make_x(shape, torch.float16, channels_last, mean=300.0, std=10.0)
    dy = make_x(shape, torch.float16, channels_last, seed=1, mean=0.0, std=1.0)
    weight, bias = make_affine(shape[1], torch.float32)
    y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
    dx, dw, db = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    y_ref, _, var64 = reference_batch_norm(x, weight, bias, EPS)
    for t in (y, mean, invstd, var, dx, dw, db):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("shape", [(32, 8, 32, 32), (4096, 16, 1, 1), (4, 64, 7, 7)], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_deterministic(dtype, channels_last, shape):
    """Two identical calls give bitwise identical outputs and gradients (TESTPLAN 23): no atomics,
    fixed merge order, also when a channel is split over blocks."""
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1)
    weight, bias = make_affine(shape[1], param_dtype(dtype))

    def step():
        y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
        grads = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
        sums = ops.backward_reduce(dy, x, mean)
        return (y, mean, invstd, var, *grads, *sums)

    first, second = step(), step()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---- streams and graphs (TESTPLAN 30) -----------------------------------------------------------------


def test_current_stream_is_used():
    """Kernels run on the current stream: work queued before them on a side stream (a long sleep,
    then writing the input) is finished when they read it."""
    shape = (8, 16, 16, 16)
    x_src = make_x(shape, torch.float32)
    dy = make_x(shape, torch.float32, seed=1)
    expected = ops.forward_train(x_src, None, None, EPS)
    expected_grads = ops.backward(dy, x_src, expected[1], expected[2], None, True, [True, True, True])
    x = torch.zeros_like(x_src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time before x is written
        x.copy_(x_src)
        out = ops.forward_train(x, None, None, EPS)
        grads = ops.backward(dy, x, out[1], out[2], None, True, [True, True, True])
    side.synchronize()
    for a, b in zip((*out, *grads), (*expected, *expected_grads), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_training_step(momentum, channels_last):
    """A training step (forward, backward, running-stat update) captured in a CUDA graph and replayed
    on new data gives what eager nn.BatchNorm2d gives from the same state."""
    channels, shape = 8, (4, 8, 16, 16)
    ours = bn_cuda.BatchNorm2d(channels, momentum=momentum, device="cuda")
    theirs = torch.nn.BatchNorm2d(channels, momentum=momentum, device="cuda")
    weight, bias = make_affine(channels, torch.float32)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)
    x = make_x(shape, torch.float32, channels_last).requires_grad_()
    dy = make_x(shape, torch.float32, channels_last, seed=1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        for _ in range(3):
            ours.zero_grad(set_to_none=True)
            x.grad = None
            ours(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    ours.zero_grad(set_to_none=True)
    x.grad = None
    with torch.cuda.graph(graph):
        y = ours(x)
        y.backward(dy)

    with torch.no_grad():
        x.copy_(make_x(shape, torch.float32, channels_last, seed=2))
    theirs.load_state_dict(ours.state_dict())  # capturing ran nothing: this is the warmed-up state
    graph.replay()
    y_t, dx_t = module_step(theirs, x, dy)
    torch.cuda.synchronize()

    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, y_t, **tol)
    torch.testing.assert_close(x.grad, dx_t, **tol)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4


# ---- CPU and CUDA agree -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (16, 4, 32, 32), (64, 10, 1, 1)], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_cpu_and_cuda_agree(dtype, channels_last, shape):
    x = make_x(shape, dtype, channels_last)
    dy = make_x(shape, dtype, channels_last, seed=1)
    weight, bias = make_affine(shape[1], dtype)
    results = {}
    for device in ("cpu", "cuda"):
        xd, dyd, wd, bd = (t.to(device) for t in (x, dy, weight, bias))
        y, mean, invstd, var = ops.forward_train(xd, wd, bd, EPS)
        grads = ops.backward(dyd, xd, mean, invstd, wd, True, [True, True, True])
        y_eval = ops.forward_eval(xd, mean, var, wd, bd, EPS)
        results[device] = (y, mean, invstd, var, *grads, y_eval)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(cuda.cpu(), cpu, **tol)


# ---- more than 2^31 elements (TESTPLAN 31) ------------------------------------------------------------


@pytest.mark.large
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_more_than_2_31_elements(channels_last):
    """1 x 64 x 8192 x 4097 float16 (2^31 + 524288 elements: 64-bit indexing) against a float64
    reference computed one channel at a time."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GB of free GPU memory, {free / 2**30:.1f} GB free")
    shape = (1, 64, 8192, 4097)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=memory_format)
    x.normal_(generator=g)
    x.add_(torch.linspace(-4, 4, 64, device="cuda", dtype=torch.float16).view(1, 64, 1, 1))
    assert x.numel() > 2**31
    dy = torch.empty_like(x).normal_(generator=g)
    weight, bias = make_affine(64, torch.float32)

    y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
    dx, dw, db = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    count = x.numel() // 64
    for c in range(64):
        xc = x[0, c].double()
        dyc = dy[0, c].double()
        m = xc.mean()
        v = xc.var(correction=0)
        istd = torch.rsqrt(v + EPS)
        assert abs(mean[c].item() - m.item()) <= 1e-4, f"mean of channel {c}"
        assert abs(var[c].item() / v.item() - 1) <= 1e-4, f"var of channel {c}"
        xhat = (xc - m) * istd
        y_ref = xhat * weight[c].double() + bias[c].double()
        assert (y[0, c].double() - y_ref).abs().max().item() <= 2e-3 * (1 + y_ref.abs().max().item()), c
        db_ref = dyc.sum()
        dw_ref = (dyc * xhat).sum()
        assert abs(db[c].item() - db_ref.item()) <= 1e-3 * dyc.norm().item(), f"grad_bias of channel {c}"
        assert abs(dw[c].item() - dw_ref.item()) <= 1e-3 * (dyc * xhat).norm().item(), f"grad_weight of {c}"
        dx_ref = (dyc - db_ref / count - xhat * dw_ref / count) * istd * weight[c].double()
        assert (dx[0, c].double() - dx_ref).abs().max().item() <= 2e-3 * (1 + dx_ref.abs().max().item()), c
