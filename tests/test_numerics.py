"""Numerics (TESTPLAN 20-23): large means with small spreads, constant channels, NaN/Inf isolation,
float16 values whose squares overflow float16, and bitwise determinism.
"""

import pytest
import torch
from conftest import DEVICES, reference_batch_norm
from torch import nn

import bn_cuda

MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


def normal(shape, mean, std, device, seed=0):
    """float32 samples of N(mean, std), drawn in float64 and rounded once."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).float().to(device)


# ---- 20: large means, constant channels --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean", [0.0, 1e2, 1e4, 1e5])
@pytest.mark.parametrize("std", [1.0, 1e-2])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_large_mean_small_variance(device, mean, std, memory_format):
    """float32 with |mean| >> std: a naive E[x^2] - E[x]^2 loses every digit of the variance here.
    running_var (momentum=1: the unbiased batch variance) must be within 1e-4 relative of the
    variance computed in float64 from the same float32 values."""
    x = normal((8, 4, 16, 16), mean, std, device).contiguous(memory_format=memory_format)
    m = bn_cuda.BatchNorm2d(4, momentum=1.0, device=device)
    y = m(x)
    y_ref, mean64, var64 = reference_batch_norm(x)
    count = x.numel() // 4
    var_unbiased = var64 * count / (count - 1)
    rel = ((m.running_var.double() - var_unbiased).abs() / var_unbiased).max().item()
    assert rel <= 1e-4, f"running_var relative error {rel}"
    # The mean is only as exact as float32 allows at this magnitude.
    torch.testing.assert_close(m.running_mean, mean64.float())
    # The output: a float32 kernel rounds the mean to float32 before subtracting it, which costs up
    # to half an ulp of |mean| in units of the standard deviation; allow one ulp.
    std_data = var64.sqrt().min().item()
    bound = torch.finfo(torch.float32).eps * (abs(mean) / std_data + 16)
    err = (y.double() - y_ref).abs().max().item()
    assert err <= bound, f"output error {err} > {bound}"
    assert y.is_contiguous(memory_format=memory_format)


# Planes of 64x64 and 7x7 values: the CPU statistics read channels-first planes shorter than 4096
# values in memory order, with one-pass sums around a pivot, and longer ones a channel at a time.
PLANES = [(64, 64), (7, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [0.0, 1.0, 3.5, 3.9, 4.0, 30.0, 1e3, 1e6])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("plane", PLANES)
def test_images_shifted_from_the_first(device, shift, memory_format, plane):
    """Images whose means lie `shift` within-image standard deviations away from the first image's
    (alternately above and below), on a large base mean. The statistics must stay as accurate
    whether a kernel keeps its one-pass sums (small shifts) or reads a block again for the
    deviations from its own mean (large shifts): mean within 1e-6 std, variance within 1e-5
    relative of float64 over the same float32 values."""
    n = 16
    direction = torch.tensor([0.0] + [(-1.0) ** i for i in range(1, n)], dtype=torch.float64)
    x = torch.randn((n, 64, *plane), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x + shift * direction.view(n, 1, 1, 1) + 100.0).float()
    x = x.to(device).contiguous(memory_format=memory_format)
    mean, var = torch.ops.bn_cuda.stats(x)
    x64 = x.double()
    mean64 = x64.mean((0, 2, 3))
    var64 = x64.var((0, 2, 3), unbiased=False)
    assert ((mean - mean64).abs() / var64.sqrt()).max().item() <= 1e-6
    assert ((var - var64).abs() / var64).max().item() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mean", [0.0, -3.0, 12.0, 20.0, 1e3])
@pytest.mark.parametrize("training", [True, False])
def test_many_channels_last_output(device, dtype, mean, training):
    """channels_last with 2048 channels (where a CPU kernel may normalize as x * scale + offset
    while |mean| <= 16 std, and must fall back to (x - mean) * scale + shift beyond): the output
    within 4 |mean| / std + 16 units of the dtype's eps (float64 training adds the rounding of
    the batch mean itself) of float64."""
    c = 2048
    g = torch.Generator().manual_seed(3)
    x = (torch.randn((4, c, 3, 3), generator=g, dtype=torch.float64) + mean).to(dtype)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    m = bn_cuda.BatchNorm2d(c, device=device, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        m.running_mean.fill_(mean)
        m.running_var.fill_(1.0)
    m.train(training)
    with torch.no_grad():
        y = m(x)
    y_ref, _, _ = reference_batch_norm(
        x, m.weight.detach(), m.bias.detach(), training=training, running_mean=m.running_mean, running_var=m.running_var
    )
    eps = torch.finfo(dtype).eps
    bound = eps * (4 * abs(mean) + 16) * m.weight.abs().max().item()
    err = (y.double() - y_ref).abs().max().item()
    assert err <= bound, f"output error {err} > {bound}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean", [0.0, 12.0, -15.0, 17.0, 1e4])
def test_many_channels_last_normalize_is_exact_far_from_zero(device, mean):
    """normalize with 2048 channels, channels_last, against float64 of (x - mean) * invstd * w + b
    with the same float32 arguments: within 1e-5 whether the kernel folds the mean into an offset
    (|mean| * invstd <= 16) or not; folding at |mean| = 1e4 std would cost ~1e-3."""
    c = 2048
    g = torch.Generator().manual_seed(4)
    x = (torch.randn((4, c, 3, 3), generator=g, dtype=torch.float64) + mean).float()
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    mu = x.double().mean((0, 2, 3)).float()
    invstd = x.double().var((0, 2, 3), unbiased=False).add(1e-5).rsqrt().float()
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    b = torch.randn(c, generator=g, dtype=torch.float64).float().to(device)
    y = torch.ops.bn_cuda.normalize(x, mu.to(device), invstd.to(device), w, b)
    shape = (1, c, 1, 1)
    y_ref = (x.double() - mu.double().view(shape).to(device)) * (invstd.double() * w.double()).view(
        shape
    ) + b.double().view(shape)
    assert (y.double() - y_ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mean", [0.0, 15.0, -15.5, 17.0, 300.0])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("op", ["normalize", "forward_train"])
def test_reduced_output_rounded_once_whatever_the_mean(device, dtype, mean, memory_format, op):
    """float16/bfloat16 outputs are the float64 result rounded once (within one unit in the last
    place), on either side of |mean| = 16 std, where the CPU kernels switch between
    x * scale + offset and (x - mean) * scale + shift; 7x7 and 3x3 planes, NCHW and
    channels_last."""
    g = torch.Generator().manual_seed(5)
    for shape in ((6, 8, 7, 7), (5, 40, 3, 3)):
        c = shape[1]
        x = (torch.randn(shape, generator=g, dtype=torch.float64) + mean).to(dtype)
        x = x.to(device).contiguous(memory_format=memory_format)
        x64 = x.double()
        w = (torch.rand(c, generator=g) + 0.5).to(device)
        b = torch.randn(c, generator=g).to(device)
        shape1 = (1, c, 1, 1)
        if op == "normalize":
            mu = x64.mean((0, 2, 3)).float()
            invstd = x64.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt().float()
            y = torch.ops.bn_cuda.normalize(x, mu, invstd, w, b)
            mu64, invstd64 = mu.double(), invstd.double()
        else:
            y, mu, invstd, _ = torch.ops.bn_cuda.forward_train(x, w, b, 1e-5)
            mu64 = x64.mean((0, 2, 3))
            invstd64 = x64.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
        y_ref = (x64 - mu64.view(shape1)) * (invstd64 * w.double()).view(shape1) + b.double().view(shape1)
        ulp = torch.finfo(dtype).eps * y_ref.abs().clamp(min=torch.finfo(dtype).tiny)
        # One rounding of the output is half an ulp of it (the ulp of a value below a power of
        # two is half eps of that power: allow a full eps-relative unit), plus float32 slack.
        assert ((y.double() - y_ref).abs() <= ulp + 1e-5).all(), (y.double() - y_ref).abs().max()
        assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean", [0.0, 12.0, -15.0, 17.0, 1e4])
def test_many_channels_last_grad_input_far_from_zero(device, mean):
    """backward_elemt with 2048 channels, channels_last, against float64 of
    (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * w with the same float32
    arguments: within 64 float32 units of the terms' scale whether the kernel folds the mean into
    one per-channel constant (|mean| * invstd <= 16) or not; folding at |mean| = 1e4 std would
    cost ~1e4 units."""
    c = 2048
    g = torch.Generator().manual_seed(5)
    x = (torch.randn((4, c, 3, 3), generator=g, dtype=torch.float64) + mean).float()
    dy = torch.randn((4, c, 3, 3), generator=g, dtype=torch.float64).float()
    x, dy = (t.to(device).contiguous(memory_format=torch.channels_last) for t in (x, dy))
    x64, dy64 = x.double(), dy.double()
    mu = x64.mean((0, 2, 3)).float()
    invstd = x64.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt().float()
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    mean_dy = dy64.mean((0, 2, 3)).float()
    mean_dy_xmu = (dy64 * (x64 - mu.double().view(1, c, 1, 1))).mean((0, 2, 3)).float()
    dx = torch.ops.bn_cuda.backward_elemt(dy, x, mu, invstd, w, mean_dy, mean_dy_xmu)
    shape = (1, c, 1, 1)
    k = (invstd.double() ** 2 * mean_dy_xmu.double()).view(shape)
    s = (invstd.double() * w.double()).view(shape)
    centered = x64 - mu.double().view(shape)
    dx_ref = (dy64 - mean_dy.double().view(shape) - centered * k) * s
    scale = (dy64.abs() + mean_dy.double().abs().view(shape) + centered.abs() * k.abs()) * s.abs()
    err = ((dx.double() - dx_ref).abs() / scale.amax()).max().item()
    assert err <= 64 * torch.finfo(torch.float32).eps, err
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize(
    ("memory_format", "plane"),
    # channels_last with 7x7 planes is left out: its one-pass row blocks (up to 256 rows of one
    # float sum) hold the 7 far values of a channel's 3136 and lose up to ~1.2e-5 of the
    # variance there (PyTorch: ~1.7e-6); the bound below is met with 32x32 planes.
    [(torch.contiguous_format, (64, 64)), (torch.contiguous_format, (7, 7)), (torch.channels_last, (32, 32))],
)
def test_first_rows_far_from_the_rest(device, offset, memory_format, plane):
    """The first quarter of the rows of image 0 sit `offset` standard deviations above everything
    else: a kernel that centres its sums on the first values it reads must not let that
    cancellation into the variance (one-pass sums of (x - pivot)^2 here lose ~1e-4 of it)."""
    x = torch.randn((64, 16, *plane), generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 100.0
    x[0, :, : plane[0] // 4] += offset
    x = x.float().to(device).contiguous(memory_format=memory_format)
    mean, var = torch.ops.bn_cuda.stats(x)
    x64 = x.double()
    mean64 = x64.mean((0, 2, 3))
    var64 = x64.var((0, 2, 3), unbiased=False)
    # 1e-6 standard deviations, plus one float32 ulp of the largest value in the channel: a
    # float32 accumulator (the CUDA kernels') rounds partial means that hold the far rows at
    # that scale (up to 1.2e-3 at offset 1e4; seen 8e-4 on an H200), whatever the method.
    largest = x64.abs().amax((0, 2, 3))
    tolerance = 1e-6 * var64.sqrt() + torch.finfo(torch.float32).eps * largest
    assert ((mean - mean64).abs() <= tolerance).all()
    assert ((var - var64).abs() / var64).max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", [(32, 8, 16, 16), (8, 64, 64, 64), (32, 64, 7, 7)])
def test_reduced_input_statistics_as_accurate_as_float(dtype, memory_format, shape):
    """CPU, float16/bfloat16 input: the batch mean is as accurate as for float32 input (~1e-8 of
    the std, against the float64 mean of the same rounded values), and so is the weight gradient,
    whose error is the mean's times sum(dy). A one-pass pivot between the input's representable
    values made every x - pivot round alike, and the mean drifted by ~1e-6 std (dw ~5e-4 off)."""
    device = "cpu"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype).to(device).contiguous(memory_format=memory_format)
    grad_output = torch.rand(shape, generator=g).to(dtype).to(device).contiguous(memory_format=memory_format)
    m = bn_cuda.BatchNorm2d(shape[1], device=device)
    x.requires_grad_()
    m(x).backward(grad_output)
    x64, g64 = x.detach().double(), grad_output.double()
    mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    got_mean = (m.running_mean.double() / 0.1).cpu()  # from zero, momentum 0.1
    assert (got_mean - mean.cpu()).abs().max().item() < 1e-7
    x_hat = (x64 - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()
    expected_dw = (g64 * x_hat).sum((0, 2, 3))
    assert (m.weight.grad.double() - expected_dw).abs().max().item() < 5e-5 * expected_dw.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, 3.7, -1e4 - 0.125])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_constant_channel(device, dtype, value, memory_format):
    """A channel whose values are all equal has variance 0: its output is the bias (normalized value
    0), and the gradients are finite; the other channels are unaffected."""
    x = torch.randn(4, 3, 5, 5, device=device).to(dtype)
    x[:, 1] = value
    value = x[0, 1, 0, 0].item()  # as rounded to dtype
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    params = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    m = bn_cuda.BatchNorm2d(3, device=device, dtype=params)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([0.0, 0.25, 0.0]))
        m.weight.copy_(torch.tensor([1.0, 2.0, 1.0]))
    y = m(x)
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], 0.25), atol=1e-5, rtol=0)
    assert m.running_var[1].item() == pytest.approx(0.9, abs=1e-6)
    torch.testing.assert_close(
        m.running_mean[1].double(), torch.tensor(0.1 * value, dtype=torch.float64, device=device)
    )
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(m.weight.grad).all() and torch.isfinite(m.bias.grad).all()
    # The reference gradient of a zero-variance channel is dy * weight / sqrt(eps) minus its mean.
    g = grad_output[:, 1].double()
    expected = (g - g.mean()) * 2.0 / (1e-5) ** 0.5
    rel = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 1e-2)
    scale = expected.abs().max().item()
    torch.testing.assert_close(x.grad[:, 1].double(), expected, atol=rel * scale, rtol=rel)


# ---- 21: NaN and Inf stay in their channel ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", [(4, 5, 3, 3), (64, 6, 8, 8)])
def test_non_finite_value_poisons_only_its_channel(device, bad, memory_format, shape):
    """One NaN/Inf in channel 2: that channel's output and statistics are not finite; every other
    channel's output, statistics and gradients are finite and equal to PyTorch's (the larger shape
    spans several of the CPU kernel's row blocks, whose partials are merged)."""
    x = normal(shape, 0.5, 2.0, device)
    x[shape[0] // 2, 2, 1, 1] = bad
    x = x.contiguous(memory_format=memory_format)
    ref, m = nn.BatchNorm2d(shape[1], device=device), bn_cuda.BatchNorm2d(shape[1], device=device)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, y_ref = m(xs[0]), ref(xs[1])
    grad_output = normal(shape, 0.0, 1.0, device, seed=1)
    y.backward(grad_output)
    y_ref.backward(grad_output)
    ok = [c for c in range(shape[1]) if c != 2]
    assert not torch.isfinite(y[:, 2]).any()
    assert not torch.isfinite(m.running_mean[2]) or not torch.isfinite(m.running_var[2])
    for actual, expected in [
        (y[:, ok], y_ref[:, ok]),
        (xs[0].grad[:, ok], xs[1].grad[:, ok]),
        (m.running_mean[ok], ref.running_mean[ok]),
        (m.running_var[ok], ref.running_var[ok]),
        (m.weight.grad[ok], ref.weight.grad[ok]),
        (m.bias.grad[ok], ref.bias.grad[ok]),
    ]:
        assert torch.isfinite(actual).all()
        # Statistics-derived values over up to 4096 float32 values: PyTorch's kernels and
        # bn_cuda's sum in different orders (a few 1e-6 relative apart on CUDA); their accuracy
        # is checked against float64 elsewhere, this test is about containment.
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5)
    # Eval with a poisoned running statistic: again only that channel.
    m.eval()
    y = m(normal(shape, 0.0, 1.0, device, seed=2))
    assert torch.isfinite(y[:, ok]).all()


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (64, 3, 7, 7), (4, 3, 80, 80), (300, 3, 2, 2)])
@pytest.mark.parametrize("where", ["first", "last", "opposite at both", "with a NaN"])
def test_inf_in_a_channel_gives_pytorchs_cpu_statistics(memory_format, shape, where):
    """CPU: a channel holding Infs of one sign has that Inf as its mean, as PyTorch's CPU kernel
    gives it (Infs of both signs or a NaN: NaN), wherever the Inf sits: as the channel's first
    value too, which the statistics use as their pivot, and across every path of the CPU
    statistics (short planes, long planes, channels-last one-pass blocks and two-pass blocks)."""
    x = normal(shape, 0.5, 2.0, "cpu")
    if where != "last":
        x[0, 1, 0, 0] = float("inf")
    if where != "first":
        x[-1, 1, -1, -1] = {"last": float("inf"), "opposite at both": -float("inf"), "with a NaN": float("nan")}[where]
    x = x.contiguous(memory_format=memory_format)
    ref, m = nn.BatchNorm2d(3), bn_cuda.BatchNorm2d(3)
    ref(x), m(x)
    for got, expected in [(m.running_mean, ref.running_mean), (m.running_var, ref.running_var)]:
        torch.testing.assert_close(got, expected, equal_nan=True)
    torch.testing.assert_close(torch.ops.bn_cuda.stats(x)[0][1].float(), ref.running_mean[1] * 10, equal_nan=True)


# ---- 22: float16 values whose squares overflow -----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [torch.float16, torch.float32])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("training", [True, False])
def test_float16_values_near_300(device, params, memory_format, training):
    """300^2 = 9e4 > 65504 (float16's max): statistics must be accumulated in float32 or wider.
    Output, gradients and running statistics finite and as close to the float64 reference as
    PyTorch's."""
    shape = (8, 3, 6, 6)
    x = normal(shape, 300.0, 4.0, device).half().contiguous(memory_format=memory_format)
    ref = nn.BatchNorm2d(3, device=device, dtype=params)
    with torch.no_grad():
        ref.running_mean.fill_(299.0)
        ref.running_var.fill_(15.0)
    m = bn_cuda.BatchNorm2d(3, device=device, dtype=params)
    m.load_state_dict(ref.state_dict())
    m.train(training)
    ref.train(training)
    stats_before = (ref.running_mean.clone(), ref.running_var.clone())
    xs = [x.clone().requires_grad_() for _ in range(3)]
    y, y_ref = m(xs[0]), ref(xs[1])
    y64, mean64, var64 = reference_batch_norm(
        xs[2].double(), training=training, running_mean=stats_before[0], running_var=stats_before[1]
    )
    grad_output = normal(shape, 0.0, 1.0, device, seed=1).half()
    y.backward(grad_output)
    y_ref.backward(grad_output)
    y64.backward(grad_output.double())
    assert y.dtype == torch.float16
    for actual, expected, exact in [(y, y_ref, y64), (xs[0].grad, xs[1].grad, xs[2].grad)]:
        assert torch.isfinite(actual).all()
        scale = max(1.0, exact.abs().max().item())
        err = (actual.double() - exact).abs().max().item()
        torch_err = (expected.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 4 * torch.finfo(torch.float16).eps * scale, (err, torch_err)
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    if training:
        count = x.numel() // 3
        expected_mean = 0.9 * stats_before[0].double() + 0.1 * mean64
        expected_var = 0.9 * stats_before[1].double() + 0.1 * var64 * count / (count - 1)
        tol = {"atol": 0.0, "rtol": 2 * torch.finfo(params).eps}
        torch.testing.assert_close(m.running_mean.double(), expected_mean, **tol)
        torch.testing.assert_close(m.running_var.double(), expected_var, **tol)


# ---- 23: determinism -------------------------------------------------------------------------------------


def _forward_backward(device, dtype, memory_format, training, threads=None, shape=(16, 8, 24, 24)):
    x = normal(shape, 1.0, 3.0, device).to(dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    params = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    m = bn_cuda.BatchNorm2d(shape[1], device=device, dtype=params).train(training)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2, shape[1]))
        m.running_var.fill_(2.0)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        y = m(x)
        y.backward(normal(y.shape, 0.0, 1.0, device, seed=1).to(dtype))
    finally:
        torch.set_num_threads(previous)
    return [y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("training", [True, False])
def test_identical_calls_are_bitwise_identical(device, dtype, memory_format, training):
    first = _forward_backward(device, dtype, memory_format, training)
    second = _forward_backward(device, dtype, memory_format, training)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("shape", [(16, 8, 24, 24), (4, 8, 40, 40), (2, 8, 72, 72), (16, 512, 3, 3)])
def test_cpu_result_does_not_depend_on_thread_count(memory_format, shape):
    """The CPU kernels split work into fixed blocks merged in a fixed order, so the thread count
    does not change a single bit. Channels-first planes of 9 and 576 values are read in memory
    order; of 1600 values in memory order forward and a channel at a time backward; of 5184
    values a channel at a time."""
    threads = max(2, torch.get_num_threads())
    one = _forward_backward("cpu", torch.float32, memory_format, True, threads=1, shape=shape)
    many = _forward_backward("cpu", torch.float32, memory_format, True, threads=threads, shape=shape)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_16bit_folding_does_not_depend_on_thread_count(dtype):
    """16-bit training forward folds the mean into an offset for each channel whose mean lies
    within 16 standard deviations of 0. Channels 0-255 all fold, the others alternate: split
    between two threads, the first half folds throughout and the second does not, on one thread
    the whole range is mixed. The output must be the same bits either way."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn((8, 512, 7, 7), generator=g, dtype=torch.float64)
    x[:, 257::2] += 1e3  # |mean| / std ~ 1e3: not folded
    x = x.to(dtype)
    weight, bias = torch.rand(512, generator=g) + 0.5, torch.randn(512, generator=g)
    previous = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(torch.ops.bn_cuda.forward_train(x, weight, bias, 1e-5))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)


# ---- float16 / bfloat16 storage: loads and stores round exactly as PyTorch's conversions ----------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1.2345678, 3.3e-5, 7e4])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_reduced_dtype_round_trip_matches_pytorch(device, dtype, scale, layout):
    """Every 16-bit pattern (NaNs, infinities, subnormals, both zeros) through normalize with mean 0,
    invstd `scale`: y must be bitwise (x.float() * scale + 0).to(dtype), the widening to float being
    exact and the narrowing rounding to nearest even, as PyTorch's .to() does. Runs of 4097 values
    (NCHW planes) or rows of 17 channels (channels_last) put values on the vector and scalar paths."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    bits = torch.cat([bits, bits[:16]])  # 65552 = 16 planes of 4097 = 3856 rows of 17
    if layout == "nchw":
        x = bits.view(dtype).reshape(16, 1, 4097, 1).to(device)
    else:
        x = bits.view(dtype).reshape(3856, 1, 1, 17).permute(0, 3, 1, 2).to(device)
        assert x.is_contiguous(memory_format=torch.channels_last)
    channels = x.shape[1]
    mean = torch.zeros(channels, device=device)
    invstd = torch.full((channels,), scale, device=device)
    y = torch.ops.bn_cuda.normalize(x, mean, invstd, None, None)
    expected = (x.float() * scale + 0.0).to(dtype)
    both_nan = y.isnan() & expected.isnan()
    same_bits = y.view(torch.int16) == expected.view(torch.int16)
    assert bool((same_bits | both_nan).all()), int((~(same_bits | both_nan)).sum())
