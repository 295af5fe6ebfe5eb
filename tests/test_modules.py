"""bn_cuda.BatchNorm1d/2d/3d as drop-ins for torch.nn's: training runs, constructor arguments,
repr, state_dict interchange, convert_model, and the package's public surface."""

import copy
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, needs_bias_argument
from torch import nn

import bn_cuda

PAIRS = {
    "1d": (nn.BatchNorm1d, bn_cuda.BatchNorm1d),
    "2d": (nn.BatchNorm2d, bn_cuda.BatchNorm2d),
    "3d": (nn.BatchNorm3d, bn_cuda.BatchNorm3d),
}
# Per class: input shapes of successive training batches (batch size and spatial size vary).
BATCHES = {
    "1d": [(8, 5), (3, 5), (6, 5, 4), (2, 5, 7)],
    "2d": [(4, 5, 3, 3), (2, 5, 4, 2), (7, 5, 1, 1), (3, 5, 5, 3)],
    "3d": [(2, 5, 2, 3, 3), (3, 5, 1, 2, 2), (1, 5, 2, 2, 3)],
}


def batch(shape, device, seed, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.7).to(device)
    return x.contiguous(memory_format=memory_format) if x.dim() in (4, 5) else x


def make_pair(kind, device, dtype=torch.float32, **kwargs):
    nn_cls, bn_cls = PAIRS[kind]
    torch.manual_seed(0)
    ref = nn_cls(5, device=device, dtype=dtype, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
    if ref.bias is not None:
        with torch.no_grad():
            ref.bias.normal_()
    mine = bn_cls(5, device=device, dtype=dtype, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def assert_same_state(mine, ref):
    sd_mine, sd_ref = mine.state_dict(), ref.state_dict()
    assert sd_mine.keys() == sd_ref.keys()
    for key, value in sd_ref.items():
        if key == "num_batches_tracked":
            assert torch.equal(sd_mine[key], value)
            assert sd_mine[key].dtype == value.dtype
        else:
            torch.testing.assert_close(sd_mine[key], value, msg=key)


def train_steps(ref, mine, shapes, device, memory_format=torch.contiguous_format):
    """Several forward/backward/SGD steps on both modules, comparing everything after each."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1) if list(ref.parameters()) else None
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.1) if list(mine.parameters()) else None
    ref.train()
    mine.train()
    for i, shape in enumerate(shapes):
        x = batch(shape, device, seed=i, memory_format=memory_format)
        dy = batch(shape, device, seed=100 + i, memory_format=memory_format)
        x_ref = x.clone().requires_grad_()
        x_mine = x.clone().requires_grad_()
        y_ref, y_mine = ref(x_ref), mine(x_mine)
        torch.testing.assert_close(y_mine, y_ref)
        assert y_mine.is_contiguous(memory_format=memory_format)
        y_ref.backward(dy)
        y_mine.backward(dy)
        torch.testing.assert_close(x_mine.grad, x_ref.grad)
        assert x_mine.grad.is_contiguous(memory_format=memory_format)
        for (name, p_mine), p_ref in zip(mine.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p_mine.grad, p_ref.grad, msg=name)
        assert_same_state(mine, ref)
        for opt in (opt_ref, opt_mine):
            if opt is not None:
                opt.step()
                opt.zero_grad()


def check_eval(ref, mine, shape, device):
    ref.eval()
    mine.eval()
    before = copy.deepcopy(mine.state_dict())
    x = batch(shape, device, seed=999)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x))
    for key, value in before.items():
        assert torch.equal(mine.state_dict()[key], value), f"eval changed {key}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None, 1.0, 0.0])
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_training_then_eval_matches_nn(kind, momentum, device):
    ref, mine = make_pair(kind, device, momentum=momentum)
    train_steps(ref, mine, BATCHES[kind], device)
    assert int(mine.num_batches_tracked) == len(BATCHES[kind])
    check_eval(ref, mine, BATCHES[kind][0], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_training_channels_last_matches_nn(kind, device):
    ref, mine = make_pair(kind, device)
    fmt = torch.channels_last if kind == "2d" else torch.channels_last_3d
    train_steps(ref, mine, BATCHES[kind], device, memory_format=fmt)
    check_eval(ref, mine, BATCHES[kind][0], device)


def script(module):
    """torch.jit.script, whose deprecation warning (PyTorch 2.14) is not this test's subject."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}], ids=str)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_torchscript_matches_nn(kind, kwargs, device):
    """A scripted bn_cuda module trains and evaluates as a scripted nn module does: outputs,
    gradients, buffers, the counter; and fails as it does (torch.jit.Error carrying nn's
    ValueError) for a wrong number of dims and for one value per channel in training."""
    ref, mine = make_pair(kind, device, **kwargs)
    ref, scripted = script(ref), script(mine)
    train_steps(ref, scripted, BATCHES[kind], device)
    check_eval(ref, scripted, BATCHES[kind][0], device)
    wrong_dims = torch.randn(2, 5, *([3] * (4 if kind == "3d" else 3)), device=device)
    one_value = torch.randn((1, 5) + (1,) * {"1d": 0, "2d": 2, "3d": 3}[kind], device=device)
    for module in (ref, scripted):
        module.train()
        with pytest.raises(torch.jit.Error, match=r"expected \dD (or \dD )?input"):
            module(wrong_dims)
        with pytest.raises(torch.jit.Error, match="more than 1 value per channel"):
            module(one_value)
    if mine.num_batches_tracked is not None:
        assert int(scripted.num_batches_tracked) == len(BATCHES[kind])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript_empty_inputs_as_nn(training):
    """Scripted, an empty batch passes through as nn's (a copy; the counter counts it in
    training, the running statistics stay), even with float64 input in a float32 module, and a
    module with no channels fails with nn's error."""
    for x in (torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4, dtype=torch.float64)):
        ref, mine = script(nn.BatchNorm2d(3).train(training)), script(bn_cuda.BatchNorm2d(3).train(training))
        expected, out = ref(x), mine(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == int(training)
        assert torch.equal(mine.running_mean, ref.running_mean) and torch.equal(mine.running_var, ref.running_var)
    errors = []
    for cls in (nn.BatchNorm2d, bn_cuda.BatchNorm2d):
        with pytest.raises(RuntimeError) as info:
            script(cls(0).train(training))(torch.randn(2, 0, 4, 4))
        errors.append(str(info.value).strip().splitlines()[-1])
    assert errors[1] == errors[0] and "select()" in errors[0]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "module_dtype, input_dtype",
    [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.float64, torch.float32)],
    ids=str,
)
def test_torchscript_refuses_mixed_dtypes_as_nn(module_dtype, input_dtype, training):
    """Scripted, the dtype rules are nn's too (the ops alone would convert the parameters), with
    nn's message; nn's comes from its kernel as a RuntimeError, bn_cuda's from scripted code as a
    torch.jit.Error (README). float32 parameters with bfloat16 input pass, as in nn."""
    x = torch.randn(4, 3, 4, 4)
    errors = []
    for cls, error_type in ((nn.BatchNorm2d, RuntimeError), (bn_cuda.BatchNorm2d, torch.jit.Error)):
        module = script(cls(3).to(module_dtype))
        module.train(training)
        with pytest.raises(error_type) as info:
            module(x.to(input_dtype))
        errors.append(str(info.value).strip().splitlines()[-1].split("RuntimeError: ")[-1])
    assert errors[1] == errors[0] and errors[0].startswith("mixed dtype (CPU)")
    mine = script(bn_cuda.BatchNorm2d(3)).train(training)
    ref = script(nn.BatchNorm2d(3)).train(training)
    torch.testing.assert_close(mine(x.bfloat16()), ref(x.bfloat16()))


def test_torchscript_of_a_converted_model():
    """A model converted with convert_model and then scripted gives the unconverted model's
    outputs and running statistics."""
    torch.manual_seed(0)
    model = TinyResNet()
    original = copy.deepcopy(model)
    scripted = script(bn_cuda.convert_model(model))
    x = batch((4, 3, 6, 6), "cpu", seed=0)
    torch.testing.assert_close(scripted(x), original(x))
    for (name, b), b_orig in zip(scripted.named_buffers(), original.buffers(), strict=True):
        torch.testing.assert_close(b, b_orig, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": 1e-3},
        {"eps": 0.5, "momentum": 0.3},
        {"affine": False},
        pytest.param({"bias": False}, marks=needs_bias_argument),
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
        pytest.param({"momentum": None, "bias": False}, marks=needs_bias_argument),
    ],
    ids=str,
)
def test_constructor_arguments(kwargs, device):
    ref, mine = make_pair("2d", device, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(mine, attr) == getattr(ref, attr), attr
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in mine.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(mine, name) is None) == (getattr(ref, name) is None), name
    assert repr(mine) == repr(ref)
    train_steps(ref, mine, BATCHES["2d"][:3], device)
    check_eval(ref, mine, BATCHES["2d"][0], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtype_and_device_arguments(dtype, device):
    m = bn_cuda.BatchNorm2d(4, device=device, dtype=dtype)
    ref = nn.BatchNorm2d(4, device=device, dtype=dtype)
    for (name, t), (_, t_ref) in zip(
        list(m.named_parameters()) + list(m.named_buffers()),
        list(ref.named_parameters()) + list(ref.named_buffers()),
        strict=True,
    ):
        assert t.dtype == t_ref.dtype, name
        assert t.device == t_ref.device and t.device.type == device, name
    if dtype == torch.float64:
        x = batch((3, 4, 2, 2), device, seed=0).double()
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m.running_var, ref.running_var)


@pytest.mark.parametrize("device", DEVICES)
def test_reduced_precision_model_half_params(device):
    """model.half(): half input with half parameters and buffers, as nn.BatchNorm2d accepts."""
    ref, mine = make_pair("2d", device)
    ref.half()
    mine.half()
    x = batch((4, 5, 3, 3), device, seed=0).half()
    y_ref, y_mine = ref(x), mine(x)
    assert y_mine.dtype == torch.float16
    torch.testing.assert_close(y_mine, y_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(mine.running_mean, ref.running_mean, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_isinstance_and_repr(kind):
    nn_cls, bn_cls = PAIRS[kind]
    m = bn_cls(7, eps=1e-3, momentum=None, affine=False, track_running_stats=False)
    assert isinstance(m, nn_cls)
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert repr(m) == repr(nn_cls(7, eps=1e-3, momentum=None, affine=False, track_running_stats=False))
    assert repr(bn_cls(3)) == repr(nn_cls(3))
    assert type(m).__name__ == nn_cls.__name__


def test_input_dim_checks_as_nn():
    with pytest.raises(ValueError, match="expected 4D input"):
        bn_cuda.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        bn_cuda.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 5D input"):
        bn_cuda.BatchNorm3d(3)(torch.randn(2, 3, 4, 4))


class _AnyRankCheck:
    """A replacement input check as a subclass might write: (N, C, L) accepted too."""

    def _check_input_dim(self, input):
        if input.dim() not in (3, 4):
            raise ValueError(f"expected 3D or 4D input (got {input.dim()}D input)")


@pytest.mark.parametrize("how", ["subclass", "instance"])
def test_replaced_input_dim_check_decides(how):
    """nn.BatchNorm's forward calls self._check_input_dim, so a replacement (a subclass's, or one
    set on the instance) decides which inputs pass: for bn_cuda's modules as for nn's."""
    modules = []
    for cls in (nn.BatchNorm2d, bn_cuda.BatchNorm2d):
        if how == "subclass":
            module = type("AnyRank", (_AnyRankCheck, cls), {})(3)
        else:
            module = cls(3)
            module._check_input_dim = lambda input, module=module: _AnyRankCheck._check_input_dim(module, input)
        modules.append(module)
    x3 = batch((4, 3, 5), "cpu", seed=0)
    torch.testing.assert_close(modules[1](x3), modules[0](x3))
    torch.testing.assert_close(modules[1].running_mean, modules[0].running_mean)
    for module in modules:
        with pytest.raises(ValueError, match="expected 3D or 4D input"):
            module(torch.randn(2, 3, 4, 4, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_reset_parameters_and_running_stats(device):
    _, mine = make_pair("2d", device)
    mine.train()(batch((4, 5, 3, 3), device, seed=1))
    assert int(mine.num_batches_tracked) == 1
    assert not torch.equal(mine.running_mean, torch.zeros(5, device=device))
    mine.reset_parameters()
    assert torch.equal(mine.weight, torch.ones(5, device=device))
    assert torch.equal(mine.bias, torch.zeros(5, device=device))
    assert torch.equal(mine.running_mean, torch.zeros(5, device=device))
    assert torch.equal(mine.running_var, torch.ones(5, device=device))
    assert int(mine.num_batches_tracked) == 0


# ---- state_dict interchange ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_state_dict_round_trip_both_ways(kind, device):
    nn_cls, bn_cls = PAIRS[kind]
    ref, mine = make_pair(kind, device)
    train_steps(ref, mine, BATCHES[kind][:2], device)
    # nn -> bn_cuda -> nn, through a serialized checkpoint.
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    loaded = bn_cls(5, device=device)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    back = nn_cls(5, device=device)
    back.load_state_dict(loaded.state_dict())
    assert_same_state(loaded, ref)
    assert_same_state(back, ref)
    x = batch(BATCHES[kind][0], device, seed=3)
    for m in (ref, loaded, back):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x))
        torch.testing.assert_close(back(x), ref(x))
    # And training from the loaded state keeps matching.
    train_steps(ref, loaded, BATCHES[kind][2:], device)


@pytest.mark.parametrize("device", DEVICES)
def test_old_checkpoint_without_num_batches_tracked(device):
    """A state_dict from before num_batches_tracked existed (version < 2) loads as in PyTorch."""
    ref, mine = make_pair("2d", device)
    train_steps(ref, mine, BATCHES["2d"][:2], device)
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    targets = [nn.BatchNorm2d(5, device=device), bn_cuda.BatchNorm2d(5, device=device)]
    for m in targets:
        result = m.load_state_dict(sd)
        assert not result.missing_keys and not result.unexpected_keys
        torch.testing.assert_close(m.running_mean, ref.running_mean)
    assert int(targets[1].num_batches_tracked) == int(targets[0].num_batches_tracked) == 0
    # Without the old version number, the missing key is reported the same way by both.
    sd._metadata[""]["version"] = 2
    for m in targets:
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            m.load_state_dict(sd)


def test_module_pickles_and_deepcopies():
    m = bn_cuda.BatchNorm2d(3, momentum=None)
    m(batch((4, 3, 2, 2), "cpu", seed=0))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(m)
    for other in (loaded, clone):
        assert type(other) is bn_cuda.BatchNorm2d
        assert_same_state(other, m)
    x = batch((4, 3, 2, 2), "cpu", seed=1)
    torch.testing.assert_close(clone(x), m(x))


# ---- convert_model ---------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, momentum=None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


class MyBatchNorm(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_model_resnet(training, dtype, device):
    torch.manual_seed(0)
    model = TinyResNet().to(device=device, dtype=dtype).train(training)
    original = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    converted = bn_cuda.convert_model(model)
    assert converted is model
    kinds = {type(m) for m in model.modules()}
    assert nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    assert type(model.stem[1]) is bn_cuda.BatchNorm2d
    assert type(model.blocks[1].bn2) is bn_cuda.BatchNorm2d
    assert type(model.head[1]) is bn_cuda.BatchNorm1d
    assert model.blocks[1].bn2.momentum is None
    assert not model.head[1].affine
    for n, p in model.named_parameters():
        assert p is params[n], n
        assert p.device.type == device and p.dtype == dtype
    for n, b in model.named_buffers():
        assert b is buffers[n], n
    assert all(m.training == training for m in model.modules())

    x = batch((4, 3, 6, 6), device, seed=0).to(dtype)
    torch.testing.assert_close(model(x), original(x))
    if dtype != torch.float64:
        return  # float32 round-off grows through the network; gradients are compared in float64
    for step in range(2):
        xs = x + step
        y_orig, y_conv = original(xs), model(xs)
        torch.testing.assert_close(y_conv, y_orig)
        y_orig.square().sum().backward()
        y_conv.square().sum().backward()
    for (n, p), p_orig in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_orig.grad, msg=n)
    for (n, b), b_orig in zip(model.named_buffers(), original.buffers(), strict=True):
        torch.testing.assert_close(b, b_orig, msg=n)


def test_convert_model_keeps_optimizer_hooks_and_attributes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    calls = []
    model[1].register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    model[1].custom_attribute = "kept"
    bn_cuda.convert_model(model)
    assert model[1].custom_attribute == "kept"
    before = model[1].weight.detach().clone()
    model(batch((2, 3, 3, 3), "cpu", seed=0)).sum().backward()
    opt.step()
    assert calls == [bn_cuda.BatchNorm2d]
    assert not torch.equal(model[1].weight, before)  # the optimizer still holds the same tensors


def test_convert_model_leaves_subclasses_and_others():
    sync = nn.SyncBatchNorm(4)
    model = nn.Sequential(MyBatchNorm(4), sync, nn.LazyBatchNorm2d(), nn.InstanceNorm2d(4), nn.BatchNorm3d(4))
    bn_cuda.convert_model(model)
    assert type(model[0]) is MyBatchNorm
    assert type(model[1]) is nn.SyncBatchNorm
    assert type(model[2]) is nn.LazyBatchNorm2d
    assert type(model[3]) is nn.InstanceNorm2d
    assert type(model[4]) is bn_cuda.BatchNorm3d


def test_convert_model_on_a_batchnorm_itself():
    m = nn.BatchNorm1d(3).eval()
    out = bn_cuda.convert_model(m)
    assert out is m
    assert type(m) is bn_cuda.BatchNorm1d
    assert not m.training


def test_convert_model_is_idempotent():
    m = nn.Sequential(nn.BatchNorm2d(3))
    bn_cuda.convert_model(bn_cuda.convert_model(m))
    assert type(m[0]) is bn_cuda.BatchNorm2d


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_revert_model_undoes_convert_model(training):
    """revert_model gives back nn's classes with the same tensors, and exact-type tools work
    again: torch.ao.quantization's conv-bn-relu fusion, which refuses bn_cuda's classes."""
    torch.manual_seed(0)
    model = TinyResNet().train(training)
    original = copy.deepcopy(model)
    bn_cuda.convert_model(model)
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert bn_cuda.revert_model(model) is model
    assert {type(m) for m in model.modules()} == {type(m) for m in original.modules()}
    assert all(t is tensors[n] for n, t in [*model.named_parameters(), *model.named_buffers()])
    assert all(m.training == training for m in model.modules())
    x = batch((4, 3, 6, 6), "cpu", seed=0)
    torch.testing.assert_close(model(x), original(x))
    fuse = torch.ao.quantization.fuse_modules_qat if training else torch.ao.quantization.fuse_modules
    converted = bn_cuda.convert_model(copy.deepcopy(original))
    with pytest.raises(AssertionError, match="fuser method"):
        fuse(converted.stem, [["0", "1", "2"]])
    fused = fuse(bn_cuda.revert_model(converted).stem, [["0", "1", "2"]])
    if not training:
        torch.testing.assert_close(fused(x), original.stem(x))


def test_revert_model_leaves_sync_and_nn_modules():
    model = nn.Sequential(nn.BatchNorm2d(3), bn_cuda.SyncBatchNorm(3), bn_cuda.BatchNorm1d(3))
    bn_cuda.revert_model(model)
    assert [type(m) for m in model] == [nn.BatchNorm2d, bn_cuda.SyncBatchNorm, nn.BatchNorm1d]
    assert type(bn_cuda.revert_model(bn_cuda.BatchNorm3d(2))) is nn.BatchNorm3d


# ---- public surface ----------------------------------------------------------------------------


def test_build_info():
    info = bn_cuda.build_info()
    assert set(info) == {"cpu", "cuda", "cuda_available", "cpu_isa", "torch", "torch_cuda"}
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda


def test_functional_signature_matches_torch():
    ours = inspect.signature(bn_cuda.functional.batch_norm, eval_str=True)
    theirs = inspect.signature(F.batch_norm, eval_str=True)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        q = ours.parameters[name]
        assert (q.kind, q.default) == (p.kind, p.default), name
    assert ours == theirs
    assert bn_cuda.batch_norm is bn_cuda.functional.batch_norm


def test_public_api():
    for name in bn_cuda.__all__:
        assert hasattr(bn_cuda, name), name
