"""torch.func transforms (grad, jvp, jacrev, hessian, vmap, per-sample gradients) and
forward-mode AD over bn_cuda's modules and functional form, against nn.BatchNorm's results under
the same transforms: values, derivatives, running statistics and errors."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import DEVICES
from torch import nn
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacrev,
    jvp,
    replace_all_batch_norm_modules_,
    stack_module_state,
    vmap,
)

import bn_cuda
import bn_cuda.functional as BF

PAIRS = {"1d": (nn.BatchNorm1d, bn_cuda.BatchNorm1d), "2d": (nn.BatchNorm2d, bn_cuda.BatchNorm2d)}
SHAPES = {"1d": (6, 3, 4), "2d": (4, 3, 3, 2)}


def make_pair(kind, device, **kwargs):
    nn_cls, bn_cls = PAIRS[kind]
    ref = nn_cls(3, device=device, dtype=torch.float64, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
            ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    if ref.running_mean is not None:
        with torch.no_grad():
            ref.running_mean.copy_(torch.tensor([0.2, -0.1, 0.4]))
            ref.running_var.copy_(torch.tensor([0.8, 1.3, 0.6]))
    mine = bn_cls(3, device=device, dtype=torch.float64, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def inputs(kind, device, seed=0, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(SHAPES[kind], generator=g, dtype=torch.float64) * 1.5 + 0.3).to(device)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def outcome(fn):
    """(result, None) or (None, the exception fn raised)."""
    try:
        return fn(), None
    except Exception as error:  # compared with nn's outcome by the caller
        return None, error


def assert_same_outcome(fn_ref, fn_mine):
    """nn's and bn_cuda's calls give the same values, or raise the same exception type (nn's
    modules refuse some transforms, e.g. a counter mutated under jvp)."""
    (expected, ref_error), (got, my_error) = outcome(fn_ref), outcome(fn_mine)
    assert type(my_error) is type(ref_error), f"bn_cuda: {my_error!r}, nn: {ref_error!r}"
    if ref_error is None:
        torch.testing.assert_close(got, expected)
    return ref_error is None


def assert_same_buffers(mine, ref):
    for (name, a), b in zip(mine.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("track_running_stats", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_jvp(kind, training, track_running_stats, device):
    """Tracked training raises for both (jvp refuses the counter's in-place update)."""
    if not training and not track_running_stats:
        pytest.skip("eval without running statistics is training's batch statistics")
    ref, mine = make_pair(kind, device, track_running_stats=track_running_stats)
    x, t = inputs(kind, device), inputs(kind, device, seed=1)
    ref.train(training)
    mine.train(training)
    ran = assert_same_outcome(lambda: jvp(ref, (x,), (t,)), lambda: jvp(mine, (x,), (t,)))
    assert ran == (not training or not track_running_stats)
    assert_same_buffers(mine, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_dual_tensors(training, device):
    """torch.autograd.forward_ad outside torch.func, through the channels_last layout: tangents
    of the output and layouts as nn's."""
    ref, mine = make_pair("2d", device)
    x = inputs("2d", device, memory_format=torch.channels_last)
    t = inputs("2d", device, seed=1, memory_format=torch.channels_last)
    results = []
    for module in (ref, mine):
        module.train(training)
        with fwAD.dual_level():
            y = module(fwAD.make_dual(x, t))
            primal, tangent = fwAD.unpack_dual(y)
            results.append((primal.clone(), tangent.clone()))
        assert primal.is_contiguous(memory_format=torch.channels_last)
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected)
    assert_same_buffers(mine, ref)


def dual_running_stats_outcome(f, duals, training, device):
    """f(input, running_mean, running_var, weight) with forward-mode tangents on the arguments
    whose indices are in `duals`: the error's type and text, or the output's tangent and the
    running mean's values and tangent after the call."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(3, 2, 5, generator=g), torch.randn(2, generator=g), torch.rand(2, generator=g) + 0.5]
    args = [a.to(device) for a in [*args, torch.rand(2, generator=g)]]
    with fwAD.dual_level():
        args = [fwAD.make_dual(a, torch.ones_like(a)) if i in duals else a for i, a in enumerate(args)]
        try:
            y = f(*args, training=training, momentum=0.1)
        except RuntimeError as error:
            return str(error)
        running_mean = fwAD.unpack_dual(args[1])
        return fwAD.unpack_dual(y).tangent, running_mean.primal.clone(), running_mean.tangent


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("duals", [(1,), (1, 2), (0, 1), (0, 2), (0, 1, 2), (1, 3), (0, 3)], ids=str)
def test_forward_mode_ad_of_running_statistics_as_nn(duals, training, device):
    """The running statistics are not differentiable, as in PyTorch: in eval their tangents stay
    out of the output's, and with a tangent on input or weight too the call raises nn's error;
    in training the update moves their values only (their tangents stay)."""
    ours = dual_running_stats_outcome(BF.batch_norm, duals, training, device)
    theirs = dual_running_stats_outcome(F.batch_norm, duals, training, "cpu")
    if isinstance(theirs, str):
        assert ours == theirs and "not differentiable wrt running_mean" in theirs
        return
    assert not isinstance(ours, str), ours
    for got, expected in zip(ours, theirs, strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_forward_mode_ad_empty_batch_and_cumulative_average(momentum, device):
    """Under a transform the running statistics move by ATen ops: an empty batch leaves them (and
    counts the batch) as nn's module does, and the cumulative factor 1 / num_batches_tracked keeps
    float64 buffers exact (it was once rounded to float32)."""
    ref, mine = make_pair("2d", device, momentum=momentum)
    for module in (ref, mine):
        with torch.no_grad():
            module.num_batches_tracked.fill_(30)
    for x in (inputs("2d", device)[:0], inputs("2d", device)):
        t = torch.ones_like(x)
        for module in (ref, mine):
            with fwAD.dual_level():
                module(fwAD.make_dual(x, t))
        for (name, a), b in zip(mine.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, b, msg=name, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", [{}, {"track_running_stats": False}, {"affine": False}], ids=str)
def test_jacrev_and_hessian(kwargs, training, device):
    """Training with a counter raises for both (a captured buffer mutated under a transform)."""
    ref, mine = make_pair("2d", device, **kwargs)
    ref.train(training)
    mine.train(training)
    x = inputs("2d", device)[:2, :, :2, :1]
    assert_same_outcome(lambda: jacrev(ref)(x), lambda: jacrev(mine)(x))
    assert_same_outcome(
        lambda: hessian(lambda t: ref(t).pow(3).sum())(x), lambda: hessian(lambda t: mine(t).pow(3).sum())(x)
    )
    assert_same_buffers(mine, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_functional_call(device):
    """torch.func.grad of a loss over the parameters, the buffers passed in beside them (the
    meta-learning pattern): same gradients, and the passed-in buffers move as nn's do."""
    ref, mine = make_pair("2d", device)
    x = inputs("2d", device)
    grads, buffers = [], []
    for module in (ref, mine):
        params = {k: v.detach() for k, v in module.named_parameters()}
        state = {k: v.clone() for k, v in module.named_buffers()}

        def loss(p, b, module=module):
            return functional_call(module, (p, b), (x,)).sin().sum()

        grads.append(grad(loss)(params, state))
        buffers.append(state)
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], msg=key)
    for key in buffers[0]:
        torch.testing.assert_close(buffers[1][key], buffers[0][key], msg=key)
    assert int(buffers[1]["num_batches_tracked"]) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_without_running_statistics_in_training(training, device):
    """vmap over a leading dimension: in eval from the running statistics, in training with
    none tracked (each sample its own batch statistics)."""
    ref, mine = make_pair("2d", device, track_running_stats=not training)
    xs = torch.stack([inputs("2d", device, seed=s) for s in range(3)])
    outs = []
    for module in (ref, mine):
        module.train(training)
        outs.append(vmap(module)(xs))
    torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_training_with_running_statistics_raises_like_nn(device):
    """Updating unbatched running statistics from batched ones is an error under vmap, for
    nn's modules as for bn_cuda's."""
    ref, mine = make_pair("2d", device)
    xs = torch.stack([inputs("2d", device, seed=s) for s in range(2)])
    errors = []
    for module in (ref, mine):
        with pytest.raises(RuntimeError) as info:
            vmap(module)(xs)
        errors.append(info.value)
    assert type(errors[1]) is type(errors[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_vmap_over_stacked_models_in_training(momentum, device):
    """Model ensembling (stack_module_state, functional_call under vmap) in training: each model's
    output, running statistics and counter as nn's module gives for that model alone (nn's own
    modules take this path too, with a momentum)."""
    refs, mines = [], []
    for seed in range(2):
        ref, mine = make_pair("2d", device, momentum=momentum)
        with torch.no_grad():
            for module in (ref, mine):
                module.weight.mul_(1 + seed)
                module.running_mean.add_(seed)
                module.num_batches_tracked.fill_(3 + seed)
        refs.append(ref)
        mines.append(mine)
    x = inputs("2d", device)
    params, buffers = stack_module_state(mines)
    base = bn_cuda.BatchNorm2d(3, momentum=momentum, device="meta", dtype=torch.float64)

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i], ref(x))
        for name, expected in ref.named_buffers():
            torch.testing.assert_close(buffers[name][i], expected, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients(device):
    """vmap(grad(...)) over samples after replace_all_batch_norm_modules_, the documented
    per-sample-gradient recipe for models with batch norm."""
    torch.manual_seed(0)
    models = []
    for cls in (nn.BatchNorm2d, bn_cuda.BatchNorm2d):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 1), cls(3), nn.Flatten(), nn.Linear(3 * 4, 1))
        models.append(replace_all_batch_norm_modules_(model.to(device=device, dtype=torch.float64)))
    xs = torch.randn(5, 2, 2, 2, dtype=torch.float64, device=device)
    targets = torch.randn(5, 1, dtype=torch.float64, device=device)
    results = []
    for model in models:
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, x, target, model=model):
            return F.mse_loss(functional_call(model, p, (x.unsqueeze(0),)), target.unsqueeze(0))

        results.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, targets))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], msg=key)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_forward_ad(device):
    """bn_cuda.functional.batch_norm passes gradcheck's forward-mode (jvp) and reverse-mode
    checks in training, weight and bias included."""
    x = inputs("2d", device).requires_grad_()
    w = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True),
        (x, w, b),
        check_forward_ad=True,
        check_batched_grad=True,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_outside_transforms_the_kernels_run(device):
    """The ATen-op path is taken only under transforms: a plain call leaves the C++ autograd
    node of the kernels' forward (ForwardTrainFunction) on its output."""
    _, mine = make_pair("2d", device)
    y = mine(inputs("2d", device).requires_grad_())
    assert "ForwardTrainFunction" in y.grad_fn.name()
