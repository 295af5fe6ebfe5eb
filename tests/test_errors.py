"""Bad input (TESTPLAN "Input validation" 1-11).

Where PyTorch defines an error, bn_cuda raises the same exception type with the same text; the
expected error is produced by PyTorch itself at test time (on the CPU, where the plan's texts were
read). Every failing call must leave weight, bias, running_mean, running_var and
num_batches_tracked exactly as they were (PyTorch increments num_batches_tracked before some of
its checks; bn_cuda does not).
"""

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_CUDA, reference_batch_norm
from torch import nn

import bn_cuda
import bn_cuda.functional as BF

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def torch_error(fn):
    """The exception PyTorch raises for ``fn()``; the test is wrong if PyTorch accepts the call."""
    try:
        fn()
    except Exception as e:
        return e
    pytest.fail("PyTorch accepted the call, so there is no error to compare with")


def assert_raises_like(expected, fn):
    """``fn()`` raises exactly ``type(expected)`` with exactly ``str(expected)``."""
    with pytest.raises(type(expected), match=f"^{re.escape(str(expected))}$") as info:
        fn()
    assert type(info.value) is type(expected)


def snapshot(tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def assert_unchanged(before, tensors):
    for b, t in zip(before, tensors, strict=True):
        if b is None:
            assert t is None
        else:
            assert t.dtype == b.dtype and torch.equal(t.detach(), b)


def module_state(m):
    return {name: t.detach().clone() for name, t in [*m.named_parameters(), *m.named_buffers()]}


def assert_module_unchanged(m, before):
    after = dict([*m.named_parameters(), *m.named_buffers()])
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name].detach(), t), name


def stats(c, device="cpu", dtype=torch.float32):
    """Non-trivial running statistics, so that an update would be visible."""
    mean = torch.linspace(-1, 1, c, dtype=dtype, device=device)
    var = torch.linspace(0.5, 2, c, dtype=dtype, device=device)
    return mean, var


# ---- 1: input rank ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        ("BatchNorm2d", (2, 3, 4)),
        ("BatchNorm2d", (2, 3, 4, 4, 4)),
        ("BatchNorm2d", (6, 3)),
        ("BatchNorm1d", (2, 3, 4, 4)),
        ("BatchNorm3d", (2, 3, 4, 4)),
    ],
)
def test_wrong_rank_raises_like_pytorch(device, training, cls, shape):
    expected = torch_error(lambda: getattr(nn, cls)(3).train(training)(torch.randn(shape)))
    m = getattr(bn_cuda, cls)(3, device=device).train(training)
    before = module_state(m)
    assert_raises_like(expected, lambda: m(torch.randn(shape, device=device)))
    assert_module_unchanged(m, before)


# ---- 2: one value per channel ----------------------------------------------------------------


ONE_VALUE_SHAPES = [
    ("BatchNorm1d", (1, 3)),
    ("BatchNorm1d", (1, 3, 1)),
    ("BatchNorm2d", (1, 3, 1, 1)),
    ("BatchNorm3d", (1, 3, 1, 1, 1)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("cls", "shape"), ONE_VALUE_SHAPES)
def test_one_value_per_channel_training_module(device, cls, shape):
    expected = torch_error(lambda: getattr(nn, cls)(3)(torch.randn(shape)))
    m = getattr(bn_cuda, cls)(3, device=device)
    before = module_state(m)
    assert_raises_like(expected, lambda: m(torch.randn(shape, device=device)))
    # PyTorch has incremented num_batches_tracked at this point; bn_cuda must not.
    assert_module_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_stats", [True, False])
def test_one_value_per_channel_training_functional(device, with_stats):
    x = torch.randn(1, 3, 1, 1)
    rm, rv = stats(3) if with_stats else (None, None)
    expected = torch_error(lambda: F.batch_norm(x, rm, rv, training=True))
    rm, rv = stats(3, device) if with_stats else (None, None)
    weight, bias = torch.rand(3, device=device), torch.rand(3, device=device)
    before = snapshot([rm, rv, weight, bias])
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), rm, rv, weight, bias, training=True))
    assert_unchanged(before, [rm, rv, weight, bias])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("cls", "shape"), ONE_VALUE_SHAPES)
def test_one_value_per_channel_eval_works(device, cls, shape):
    ref = getattr(nn, cls)(3, device=device)
    m = getattr(bn_cuda, cls)(3, device=device)
    with torch.no_grad():
        for mod in (ref, m):
            mod.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            mod.running_var.copy_(torch.tensor([0.25, 4.0, 1.5]))
            mod.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            mod.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    ref.eval()
    m.eval()
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(m(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 2, 1), (2, 3, 1, 1), (1, 3, 1, 2)])
def test_two_values_per_channel_trains(device, shape):
    # Checked against float64: with two values per channel the variance can be comparable to eps,
    # where PyTorch's float32 result itself may be off by more than assert_close's tolerance.
    m = bn_cuda.BatchNorm2d(3, device=device)
    x = torch.randn(shape, device=device, dtype=torch.float64).float()
    expected, mean, var = reference_batch_norm(x)
    torch.testing.assert_close(m(x), expected.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_mean, (0.1 * mean).float())
    torch.testing.assert_close(m.running_var, (0.9 + 0.1 * 2 * var).float())  # unbiased: 2 values
    assert m.num_batches_tracked.item() == 1


# ---- 3: per-channel vectors of the wrong length ---------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, True), (True, False)])
def test_module_with_wrong_channel_count(device, training, affine, track):
    """BatchNorm2d(3) fed 4 channels: the first mismatch PyTorch reports is the one reported."""
    expected = torch_error(
        lambda: nn.BatchNorm2d(3, affine=affine, track_running_stats=track).train(training)(torch.randn(2, 4, 3, 3))
    )
    m = bn_cuda.BatchNorm2d(3, affine=affine, track_running_stats=track, device=device).train(training)
    before = module_state(m)
    assert_raises_like(expected, lambda: m(torch.randn(2, 4, 3, 3, device=device)))
    assert_module_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("wrong", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("size", [2, 4, 6])
def test_functional_with_wrong_channel_count(device, training, wrong, size):
    def args(dev):
        rm, rv = stats(3, dev)
        tensors = {"running_mean": rm, "running_var": rv, "weight": torch.rand(3, device=dev) + 0.5}
        tensors["bias"] = torch.rand(3, device=dev)
        tensors[wrong] = torch.rand(size, device=dev) + 0.5
        return tensors

    x = torch.randn(2, 3, 4, 4)
    expected = torch_error(lambda: F.batch_norm(x, **args("cpu"), training=training))
    tensors = args(device)
    before = snapshot(list(tensors.values()))
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), **tensors, training=training))
    assert_unchanged(before, list(tensors.values()))


# ---- 4, 5: missing running statistics -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("present", ["neither", "running_mean", "running_var"])
def test_missing_running_stats(device, training, present):
    """Eval needs both running statistics; training needs both or neither."""
    if training and present == "neither":
        pytest.skip("valid: training without running statistics")

    def args(dev):
        rm, rv = stats(3, dev)
        return {
            "running_mean": rm if present == "running_mean" else None,
            "running_var": rv if present == "running_var" else None,
            "weight": torch.ones(3, device=dev),
            "bias": torch.zeros(3, device=dev),
        }

    x = torch.randn(2, 3, 4, 4)
    expected = torch_error(lambda: F.batch_norm(x, **args("cpu"), training=training))
    tensors = args(device)
    before = snapshot(list(tensors.values()))
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), **tensors, training=training))
    assert_unchanged(before, list(tensors.values()))


# ---- 6: eps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("training", "eps"), [(True, 0.0), (True, -1.0), (True, -1e-12), (False, -1.0)])
def test_bad_eps_functional(device, training, eps):
    x = torch.randn(2, 3, 4, 4)
    rm, rv = stats(3)
    expected = torch_error(lambda: F.batch_norm(x, rm, rv, training=training, eps=eps))
    rm, rv = stats(3, device)
    before = snapshot([rm, rv])
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), rm, rv, training=training, eps=eps))
    assert_unchanged(before, [rm, rv])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("training", "eps"), [(True, 0.0), (False, -1.0)])
def test_bad_eps_module(device, training, eps):
    expected = torch_error(lambda: nn.BatchNorm2d(3, eps=eps).train(training)(torch.randn(2, 3, 4, 4)))
    m = bn_cuda.BatchNorm2d(3, eps=eps, device=device).train(training)
    before = module_state(m)
    assert_raises_like(expected, lambda: m(torch.randn(2, 3, 4, 4, device=device)))
    assert_module_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_eps_in_eval_like_pytorch(device):
    """eps = 0 in eval: PyTorch 2.13 on computes with it, older releases refuse it; either way
    bn_cuda does what the installed PyTorch does."""
    x = torch.randn(2, 3, 4, 4, device=device)
    rm, rv = stats(3, device)
    w, b = torch.rand(3, device=device), torch.rand(3, device=device)
    try:
        expected = F.batch_norm(x, rm, rv, w, b, training=False, eps=0.0)
    except ValueError as error:
        assert_raises_like(error, lambda: BF.batch_norm(x, rm, rv, w, b, training=False, eps=0.0))
        return
    out = BF.batch_norm(x, rm, rv, w, b, training=False, eps=0.0)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_nan_eps_computes_like_pytorch(device, training):
    """eps = NaN passes PyTorch's checks (they are comparisons) and makes every output NaN; the
    running statistics move as usual (the unbiased variance does not involve eps)."""
    x = torch.randn(4, 3, 5, 5)
    theirs = nn.BatchNorm2d(3, eps=float("nan")).train(training)
    ours = bn_cuda.BatchNorm2d(3, eps=float("nan"), device=device).train(training)
    expected = theirs(x)
    out = ours(x.to(device))
    assert out.isnan().all() and expected.isnan().all()
    torch.testing.assert_close(ours.running_mean.cpu(), theirs.running_mean)
    torch.testing.assert_close(ours.running_var.cpu(), theirs.running_var)
    out = BF.batch_norm(x.to(device), None, None, training=True, eps=float("nan"))
    assert out.isnan().all()


# ---- 7: unsupported input dtypes -----------------------------------------------------------------

BAD_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", BAD_DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_unsupported_input_dtype_functional(device, dtype, training):
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    rm, rv = stats(3)
    expected = torch_error(lambda: F.batch_norm(x, rm, rv, training=training))
    rm, rv = stats(3, device)
    before = snapshot([rm, rv])
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), rm, rv, training=training))
    assert_unchanged(before, [rm, rv])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_unsupported_input_dtype_module(device, dtype):
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    expected = torch_error(lambda: nn.BatchNorm2d(3)(x))
    m = bn_cuda.BatchNorm2d(3, device=device)
    before = module_state(m)
    assert_raises_like(expected, lambda: m(x.to(device)))
    assert_module_unchanged(m, before)


# ---- 8: mixed dtypes ------------------------------------------------------------------------------


def close_in_dtype(actual, expected, reference):
    """``actual`` (bn_cuda) is at most 2x as far from the float64 ``reference`` as ``expected``
    (PyTorch, same dtype), plus a few units in the last place."""
    atol = 4 * torch.finfo(actual.dtype).eps
    err = (actual.double() - reference).abs().max().item()
    torch_err = (expected.double() - reference).abs().max().item()
    assert err <= 2 * torch_err + atol, (err, torch_err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_reduced_input_with_float32_params(device, dtype, training):
    """float16/bfloat16 input with float32 parameters and stats, as autocast and AMP produce."""
    ref = nn.BatchNorm2d(5, device=device).train(training)
    m = bn_cuda.BatchNorm2d(5, device=device).train(training)
    with torch.no_grad():
        for mod in (ref, m):
            mod.weight.copy_(torch.linspace(0.5, 2, 5))
            mod.bias.copy_(torch.linspace(-1, 1, 5))
            mod.running_mean.copy_(torch.linspace(-0.2, 0.2, 5))
            mod.running_var.copy_(torch.linspace(0.8, 1.2, 5))
    x = torch.randn(4, 5, 6, 6, device=device).to(dtype)
    stats_before = snapshot([ref.running_mean, ref.running_var])
    y, y_ref = m(x), ref(x)
    assert y.dtype == dtype
    reference, _, _ = reference_batch_norm(
        x,
        ref.weight.detach(),
        ref.bias.detach(),
        training=training,
        running_mean=stats_before[0],
        running_var=stats_before[1],
    )
    close_in_dtype(y, y_ref, reference)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert m.weight.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, atol=2e-2, rtol=2e-2)
    assert m.running_mean.dtype == torch.float32
    torch.testing.assert_close(m.running_mean, ref.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(m.running_var, ref.running_var, atol=1e-3, rtol=1e-3)


# (input, weight, bias, running_mean, running_var); None: that argument is not passed.
REJECTED_DTYPES = [
    (torch.float64, torch.float32, torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float32, None, None, None),
    (torch.float64, None, None, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.float16, None, None, None),
    (torch.float32, torch.float64, torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float32, torch.float64, torch.float64),
    (torch.float32, None, None, torch.float64, torch.float64),
    (torch.float32, None, None, torch.int64, torch.int64),
    (torch.float32, torch.float32, None, torch.int64, torch.int64),  # "... but found Long"
    (torch.float16, torch.float16, torch.float16, torch.float32, torch.float32),
    (torch.float16, None, None, torch.float64, torch.float64),
    (torch.float16, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16, None, None, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtypes", REJECTED_DTYPES, ids=lambda d: "-".join(str(t).split(".")[-1] for t in d))
def test_rejected_dtype_mix(device, training, dtypes):
    in_dtype, w_dtype, b_dtype, rm_dtype, rv_dtype = dtypes
    if not training and rm_dtype is None:
        pytest.skip("eval needs running statistics")

    def args(dev):
        def make(dtype, value):
            return None if dtype is None else torch.full((3,), value, device=dev).to(dtype)

        return {
            "running_mean": make(rm_dtype, 0),
            "running_var": make(rv_dtype, 1),
            "weight": make(w_dtype, 1),
            "bias": make(b_dtype, 0),
        }

    x = torch.randn(2, 3, 4, 4)
    expected = torch_error(lambda: F.batch_norm(x.to(in_dtype), **args("cpu"), training=training))
    tensors = args(device)
    before = snapshot(list(tensors.values()))
    call = lambda: BF.batch_norm(x.to(device, in_dtype), **tensors, training=training)
    if device == "cpu":
        assert_raises_like(expected, call)
    else:
        # PyTorch's texts were read on the CPU; on CUDA the plan only asks for a RuntimeError.
        with pytest.raises(RuntimeError):
            call()
    assert_unchanged(before, list(tensors.values()))


def test_dtype_rules_match_pytorch_for_every_combination():
    """Every dtype combination of input, weight, bias and running stats, training and eval: bn_cuda
    accepts exactly what PyTorch accepts (output in the input's dtype) and otherwise raises the same
    text. PyTorch's text depends on the order it checks the arguments in, which this pins down."""
    dtypes = [None, torch.float16, torch.bfloat16, torch.float32, torch.float64]
    x = torch.randn(2, 3, 2, 2)
    mismatches = []
    for in_dtype, w, b, s in itertools.product(dtypes[1:], dtypes, dtypes, dtypes):
        # running_var as running_mean, and float32 next to a running_mean of another dtype.
        rv_dtypes = [s] if s in (None, torch.float32) else [s, torch.float32]
        for rv_dtype, training in itertools.product(rv_dtypes, [True, False]):
            if not training and s is None:
                continue

            def make(dtype, value):
                return None if dtype is None else torch.full((3,), value, dtype=dtype)

            def call(fn, s=s, rv_dtype=rv_dtype, training=training, w=w, b=b, in_dtype=in_dtype):
                args = (make(s, 0.0), make(rv_dtype, 1.0), make(w, 1.0), make(b, 0.0))
                try:
                    return "ok", fn(x.to(in_dtype), *args, training=training).dtype
                except Exception as e:
                    return type(e).__name__, str(e)

            expected, actual = call(F.batch_norm), call(BF.batch_norm)
            if expected != actual:
                mismatches.append((in_dtype, w, b, s, rv_dtype, training, expected, actual))
    assert not mismatches, "\n".join(map(str, mismatches[:10])) + f"\n... {len(mismatches)} in all"


@pytest.mark.parametrize("device", DEVICES)
def test_float64_input_to_float32_module(device):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = torch_error(lambda: nn.BatchNorm2d(3)(x))
    m = bn_cuda.BatchNorm2d(3, device=device)
    before = module_state(m)
    with pytest.raises(type(expected)) as info:
        m(x.to(device))
    if device == "cpu":
        assert str(info.value) == str(expected)
    assert_module_unchanged(m, before)


# ---- 9: running statistics that require grad -------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_requiring_grad(device, training, which):
    def args(dev):
        rm, rv = stats(3, dev)
        tensors = {"running_mean": rm, "running_var": rv}
        tensors[which].requires_grad_()
        return tensors

    x = torch.randn(2, 3, 4, 4)
    expected = torch_error(lambda: F.batch_norm(x, **args("cpu"), training=training))
    assert which in str(expected) and "'native_batch_norm'" in str(expected)
    tensors = args(device)
    before = snapshot(list(tensors.values()))
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), **tensors, training=training))
    assert_unchanged(before, list(tensors.values()))


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_requiring_grad_under_no_grad(device):
    """PyTorch accepts (and updates) running statistics that require grad when grad mode is off."""
    x = torch.randn(2, 3, 4, 4, device=device)
    expected = [t.requires_grad_() for t in stats(3, device)]
    actual = [t.detach().clone().requires_grad_() for t in expected]
    with torch.no_grad():
        y_ref = F.batch_norm(x, *expected, training=True)
        y = BF.batch_norm(x, *actual, training=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(actual, expected)


# ---- 10: tensors on different devices ---------------------------------------------------------------


def _device_cases():
    cases = [
        pytest.param("cpu", "meta", "cpu", id="stats-on-meta"),
        pytest.param("cpu", "cpu", "meta", id="weight-on-meta"),
        pytest.param("meta", "cpu", "cpu", id="input-on-meta"),
    ]
    for name, devs in {
        "input-on-cuda": ("cuda", "cpu", "cpu"),
        "stats-on-cuda": ("cpu", "cuda", "cpu"),
        "weight-on-cuda": ("cpu", "cpu", "cuda"),
        "weight-on-cpu": ("cuda", "cuda", "cpu"),
        "stats-on-meta-cuda": ("cuda", "meta", "cuda"),
    }.items():
        cases.append(pytest.param(*devs, id=name, marks=needs_cuda))
    return cases


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("x_device", "stats_device", "weight_device"), _device_cases())
def test_tensors_on_different_devices(training, x_device, stats_device, weight_device):
    x = torch.randn(2, 3, 4, 4, device=x_device)
    rm, rv = stats(3, stats_device)
    weight, bias = torch.rand(3, device=weight_device), torch.rand(3, device=weight_device)
    tensors = [rm, rv, weight, bias]
    before = snapshot([t for t in tensors if t.device.type != "meta"])
    with pytest.raises(RuntimeError, match="device"):
        BF.batch_norm(x, rm, rv, weight, bias, training=training)
    assert_unchanged(before, [t for t in tensors if t.device.type != "meta"])


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=needs_cuda)])
def test_module_on_cpu_with_input_elsewhere(device):
    m = bn_cuda.BatchNorm2d(3)
    before = module_state(m)
    with pytest.raises(RuntimeError, match="device"):
        m(torch.randn(2, 3, 4, 4, device=device))
    assert_module_unchanged(m, before)


# ---- 11: no channels, and other empty inputs -----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_zero_channels_module(device, training):
    """nn.BatchNorm2d(0) fails with an IndexError from deep inside (weight[0]); bn_cuda raises an
    IndexError too, saying what is wrong, and changes nothing."""
    expected = torch_error(lambda: nn.BatchNorm2d(0).train(training)(torch.randn(2, 0, 4, 4)))
    assert type(expected) is IndexError
    m = bn_cuda.BatchNorm2d(0, device=device).train(training)
    before = module_state(m)
    with pytest.raises(IndexError, match="needs at least one channel"):
        m(torch.randn(2, 0, 4, 4, device=device))
    assert_module_unchanged(m, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (2, 0), (0, 0, 3)])
def test_zero_channels_without_affine_like_pytorch(device, training, shape):
    """Without weight and bias, PyTorch passes an input with no channels through (a copy)."""
    x = torch.randn(shape, device=device)
    expected = F.batch_norm(x.cpu(), torch.zeros(0), torch.ones(0), training=training)
    rm, rv = torch.zeros(0, device=device), torch.ones(0, device=device)
    out = BF.batch_norm(x, rm, rv, training=training)
    assert out.shape == expected.shape == x.shape and out is not x
    m = bn_cuda.BatchNorm2d(0, affine=False, device=device).train(training)
    if len(shape) == 4:
        assert m(x).shape == nn.BatchNorm2d(0, affine=False).train(training)(x.cpu()).shape


def _empty_cases(device):
    """(name, call of a batch_norm function f) for inputs with no elements: PyTorch's batch_norm
    returns input.clone() * weight[0] + bias[0] for them before checking the other arguments."""
    e = torch.randn(0, 3, 2, 2, device=device)
    z, o = torch.zeros(3, device=device), torch.ones(3, device=device)
    return [
        ("no stats in eval", lambda f: f(e, None, None, training=False)),
        (
            "stats of the wrong size",
            lambda f: f(e, torch.zeros(5, device=device), torch.ones(5, device=device), training=True),
        ),
        ("weight of the wrong size", lambda f: f(e, z, o, torch.ones(2, device=device), training=False)),
        (
            "integer input",
            lambda f: f(torch.zeros(0, 3, 2, dtype=torch.long, device=device), None, None, training=True),
        ),
        (
            "integer input, float weight",
            lambda f: f(torch.zeros(0, 3, dtype=torch.long, device=device), None, None, o, training=True),
        ),
        ("float64 running stats", lambda f: f(e, z.double(), o.double(), training=True)),
        ("bfloat16 weight", lambda f: f(e, None, None, o.bfloat16(), z.bfloat16(), training=True)),
        ("running stats requiring grad", lambda f: f(e, z.clone().requires_grad_(), o, training=True)),
        ("empty weight", lambda f: f(e, None, None, torch.ones(0, device=device), training=True)),
        ("empty bias", lambda f: f(e, None, None, o, torch.ones(0, device=device), training=False)),
        ("1-D empty", lambda f: f(torch.randn(0, device=device), None, None, training=True)),
        ("1-D empty with weight", lambda f: f(torch.randn(0, device=device), None, None, o, z, training=True)),
        ("zero width", lambda f: f(torch.randn(2, 3, 4, 0, device=device), z, o, o, z, training=True)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs_like_pytorch(device):
    """Every call on an empty input has PyTorch's outcome: the same result (shape, dtype, memory
    format, requires_grad) or the same exception type; the running statistics stay."""
    for (name, call), (_, theirs_call) in zip(_empty_cases(device), _empty_cases("cpu"), strict=True):
        try:
            expected = theirs_call(F.batch_norm)
        except Exception as error:
            with pytest.raises(type(error)):
                call(BF.batch_norm)
            continue
        out = call(BF.batch_norm)
        assert out.shape == expected.shape and out.dtype == expected.dtype, name
        assert out.requires_grad == expected.requires_grad, name


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input_gradients_reach_weight_and_bias(device):
    """As in PyTorch, the output of an empty input hangs on weight and bias: their grads are zeros."""
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.rand(3, device=device, requires_grad=True)
    out = BF.batch_norm(torch.randn(0, 3, 4, device=device), None, None, w, b, training=True)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- several problems at once: the one PyTorch reports first ------------------------------------

VIOLATIONS = {
    "running_mean size": {"running_mean": lambda: torch.zeros(2)},
    "running_var size": {"running_var": lambda: torch.ones(2)},
    "weight size": {"weight": lambda: torch.ones(2)},
    "bias size": {"bias": lambda: torch.zeros(2)},
    "running_mean requires grad": {"running_mean": lambda: torch.zeros(3, requires_grad=True)},
    "running_var requires grad": {"running_var": lambda: torch.ones(3, requires_grad=True)},
    "no running_mean": {"running_mean": lambda: None},
    "float64 weight": {"weight": lambda: torch.ones(3, dtype=torch.float64)},
    "integer input": {"input": lambda: torch.ones(4, 3, 2, dtype=torch.long)},
    "list weight": {"weight": lambda: [1.0, 1.0, 1.0]},
    "one value per channel": {"input": lambda: torch.randn(1, 3)},
    "negative eps": {"eps": lambda: -1.0},
    "eps None": {"eps": lambda: None},
    "momentum None": {"momentum": lambda: None},
    "training an int": {"training": lambda: 1},
}
VIOLATION_PAIRS = [
    (a, b)
    for i, a in enumerate(VIOLATIONS)
    for b in list(VIOLATIONS)[i + 1 :]
    if not set(VIOLATIONS[a]) & set(VIOLATIONS[b])
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pair", VIOLATION_PAIRS, ids=" + ".join)
def test_first_error_in_pytorchs_order(pair, training):
    """Two problems in one call: bn_cuda reports the one PyTorch's CPU batch norm reports (its
    Python checks, its parser's argument order, then its kernel's checks), same type and text."""

    def kwargs():
        k = {
            "input": torch.randn(4, 3, 2),
            "running_mean": torch.zeros(3),
            "running_var": torch.ones(3),
            "weight": torch.ones(3),
            "bias": torch.zeros(3),
            "training": training,
        }
        for name in pair:
            k.update({key: make() for key, make in VIOLATIONS[name].items()})
        return k

    try:
        F.batch_norm(**kwargs())
    except Exception as error:
        assert_raises_like(error, lambda: BF.batch_norm(**kwargs()))
    else:
        BF.batch_norm(**kwargs())


# ---- argument types (beyond the plan's list: F.batch_norm's own TypeErrors) ------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_non_tensor_argument(device, name):
    """PyTorch rejects a list where a tensor belongs with a TypeError naming the argument."""
    kwargs = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": None, "bias": None}
    kwargs[name] = [1.0, 1.0, 1.0]
    expected = torch_error(lambda: F.batch_norm(torch.randn(2, 3, 4), training=True, **kwargs))
    assert type(expected) is TypeError and name in str(expected)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    before = snapshot([v for v in kwargs.values() if isinstance(v, torch.Tensor)])
    with pytest.raises(TypeError, match=name):
        BF.batch_norm(torch.randn(2, 3, 4, device=device), training=True, **kwargs)
    assert_unchanged(before, [v for v in kwargs.values() if isinstance(v, torch.Tensor)])


@pytest.mark.parametrize("device", DEVICES)
def test_functional_momentum_none(device):
    """F.batch_norm takes a float momentum (None is nn.BatchNorm's cumulative-average switch, not
    the functional's); accepting None silently would freeze the running statistics."""
    x = torch.randn(2, 3, 4)
    expected = torch_error(lambda: F.batch_norm(x, *stats(3), training=True, momentum=None))
    rm, rv = stats(3, device)
    before = snapshot([rm, rv])
    with pytest.raises(type(expected), match="momentum"):
        BF.batch_norm(x.to(device), rm, rv, training=True, momentum=None)
    assert_unchanged(before, [rm, rv])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "momentum",
    [
        pytest.param(lambda: np.float32(0.3), id="numpy-float32"),
        pytest.param(lambda: np.int64(0), id="numpy-int64"),
        pytest.param(lambda: np.bool_(True), id="numpy-bool"),
        pytest.param(lambda: torch.tensor(0.3, dtype=torch.float64), id="0-dim-tensor"),
    ],
)
def test_functional_momentum_types_torch_takes(momentum, device):
    """The momentum values torch.batch_norm's argument parser takes besides float: NumPy real
    scalars and 0-dim tensors; the running statistics move as PyTorch moves them."""
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = stats(3)
    expected = [t.double() for t in expected]
    F.batch_norm(x, *expected, training=True, momentum=momentum())
    rm, rv = (t.double() for t in stats(3, device))
    BF.batch_norm(x.to(device), rm, rv, training=True, momentum=momentum())
    torch.testing.assert_close(rm.cpu(), expected[0])
    torch.testing.assert_close(rv.cpu(), expected[1])


@pytest.mark.parametrize("device", DEVICES)
def test_functional_momentum_fraction_refused_like_torch(device):
    """numbers.Real is not what torch's parser takes: a Fraction momentum is a TypeError."""
    from fractions import Fraction

    x = torch.randn(2, 3, 4)
    expected = torch_error(lambda: F.batch_norm(x, *stats(3), training=True, momentum=Fraction(1, 3)))
    rm, rv = stats(3, device)
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), rm, rv, training=True, momentum=Fraction(1, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [None, 1, torch.tensor(True), np.bool_(True)], ids=repr)
def test_functional_training_must_be_bool(training, device):
    """torch.batch_norm takes only a bool for training; None, ints, tensors and NumPy bools are
    type errors, not modes."""
    x = torch.randn(2, 3, 4)
    expected = torch_error(lambda: F.batch_norm(x, *stats(3), training=training))
    rm, rv = stats(3, device)
    before = snapshot([rm, rv])
    assert_raises_like(expected, lambda: BF.batch_norm(x.to(device), rm, rv, training=training))
    assert_unchanged(before, [rm, rv])


# ---- the fast acceptance of valid calls ---------------------------------------------------------


def _argument_variants():
    """Arguments of check_batch_norm_args, valid and not: every dtype pairing, sizes, None-ness,
    devices, eps, mode and requires_grad, crossed."""
    c = 3
    for in_dtype, p_dtype, shape, present, p_size, training, eps, grad_stats, p_device in itertools.product(
        [torch.float32, torch.float16, torch.float64, torch.int64],
        [torch.float32, torch.float16, torch.float64, torch.bfloat16],
        [(4, c, 2), (1, c, 1), (4, 0, 2), (c,), (0,)],
        ["all", "no stats", "no affine", "one stat"],
        [c, c + 1],
        [True, False],
        [1e-5, 0.0],
        [False, True],
        ["cpu", "meta"],
    ):
        x = torch.zeros(shape, dtype=in_dtype)

        def param(value, size=p_size, dtype=p_dtype, device=p_device):
            return torch.full((size,), value, dtype=dtype, device=device)

        rm, rv, w, b = param(0.0), param(1.0), param(1.0), param(0.0)
        rm.requires_grad_(grad_stats and p_dtype.is_floating_point)
        if present == "no stats":
            rm = rv = None
        elif present == "no affine":
            w = b = None
        elif present == "one stat":
            rv = None
        yield x, rm, rv, w, b, training, eps


def test_fast_acceptance_only_accepts_what_the_full_check_accepts(monkeypatch):
    """_plainly_valid (run first on every call) says "valid" only for calls the full ordered
    check lets through, so a failing call always reaches the check that words its error."""
    accepted = [args for args in _argument_variants() if BF._plainly_valid(*args)]
    assert len(accepted) >= 20  # the crossing above does include valid calls
    monkeypatch.setattr(BF, "_plainly_valid", lambda *args: False)  # the full check alone
    for args in accepted:
        BF.check_batch_norm_args(*args)  # must not raise
