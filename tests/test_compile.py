"""torch.compile(fullgraph=True) of models using bn_cuda (TESTPLAN 28): compiled training and eval
match eager bn_cuda and torch.nn, running statistics included; the compiled forward and backward
call bn_cuda's kernels. Compilation is slow on small CPUs, so the models are tiny and few."""

import copy

import pytest
import torch
from conftest import DEVICES
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import bn_cuda

BN_OPS = {"forward_train", "forward_eval", "backward", "update_running_stats"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from an empty cache. Some torch releases compile every module's
    forward through one shared wrapper code object, so the compiles of earlier tests in the same
    process would count toward its recompile limit (8) and fail a later fullgraph test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_net(bn_cls, momentum2=0.1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        bn_cls(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        bn_cls(5, momentum=momentum2),
        nn.ReLU(),
    )


def model_triple(device, dtype, momentum2=0.1, memory_format=torch.contiguous_format):
    """(nn model, eager bn_cuda model, bn_cuda model to compile) with identical state."""
    ref = small_net(nn.BatchNorm2d, momentum2).to(device=device, dtype=dtype, memory_format=memory_format)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    eager = bn_cuda.convert_model(copy.deepcopy(ref))
    compiled = bn_cuda.convert_model(copy.deepcopy(ref))
    return ref, eager, compiled


def inputs(shape, device, dtype, seed, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5)
        .to(device, dtype)
        .contiguous(memory_format=memory_format)
    )


def assert_models_equal(model, expected, grads=True):
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
        if grads:
            torch.testing.assert_close(p.grad, q.grad, msg=f"{name}.grad")
    for (name, b), c in zip(model.named_buffers(), expected.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)
        assert b.dtype == c.dtype, name


def train_step(model, opt, x):
    y = model(x)
    y.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return y


class GraphRecorder:
    """An aot_autograd backend that keeps the forward and backward FX graphs and runs them as is."""

    def __init__(self):
        self.graphs = []

    def _compiler(self, kind):
        def compile_graph(gm, example_inputs):
            self.graphs.append((kind, gm))
            return make_boxed_func(gm.forward)

        return compile_graph

    def backend(self):
        return aot_autograd(fw_compiler=self._compiler("forward"), bw_compiler=self._compiler("backward"))

    def targets(self, kind):
        """Names of the call_function targets of the graphs of one kind (auto_functionalized
        higher-order ops are reported as the op they wrap)."""
        names = []
        for k, gm in self.graphs:
            if k != kind:
                continue
            for node in gm.graph.nodes:
                if node.op != "call_function":
                    continue
                target = node.target
                if "auto_functionalized" in str(target):
                    target = node.args[0]
                names.append(str(target))
        return names


def bn_calls(names):
    return sorted(n.split(".")[1] for n in names if n.startswith("bn_cuda."))


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_training_and_eval_match_eager_and_nn(device):
    """Three SGD steps (optimizer outside the compiled region) with one BatchNorm2d at
    momentum=0.1 and one at momentum=None, then eval. float64 so that compiled, eager and
    torch.nn agree to the default tolerances."""
    dtype = torch.float64
    ref, eager, mine = model_triple(device, dtype, momentum2=None)
    compiled = torch.compile(mine, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, eager, mine)]
    code = []
    for step, n in enumerate((4, 4, 4)):
        x = inputs((n, 3, 5, 5), device, dtype, seed=step)
        y_ref = train_step(ref, opts[0], x)
        y_eager = train_step(eager, opts[1], x)
        if step == 0:
            y, code = run_and_get_code(train_step, compiled, opts[2], x)
        else:
            y = train_step(compiled, opts[2], x)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(y, y_ref)
        assert_models_equal(mine, eager)
        assert_models_equal(mine, ref)
    assert int(mine[4].num_batches_tracked) == 3
    source = "\n".join(code)
    for op in BN_OPS - {"forward_eval"}:
        assert f"bn_cuda.{op}" in source, op
    assert "native_batch_norm" not in source

    for m in (ref, eager, mine):
        m.eval()
    x = inputs((3, 3, 5, 5), device, dtype, seed=10)
    with torch.no_grad():
        y, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(y, eager(x))
        torch.testing.assert_close(y, ref(x))
    assert "bn_cuda.forward_eval" in "\n".join(code)
    assert_models_equal(mine, ref, grads=False)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_graphs_call_bn_cuda_kernels(device):
    """Forward: forward_train + update_running_stats; backward: the fused bn_cuda.backward
    (not the differentiable composition used for double backward, not a decomposition)."""
    recorder = GraphRecorder()
    _, eager, mine = model_triple(device, torch.float32, momentum2=None)
    compiled = torch.compile(mine, backend=recorder.backend(), fullgraph=True)
    x = inputs((2, 3, 4, 4), device, torch.float32, seed=0)
    compiled(x).sum().backward()
    eager(x).sum().backward()
    assert_models_equal(mine, eager)

    forward, backward = recorder.targets("forward"), recorder.targets("backward")
    assert bn_calls(forward) == ["forward_train", "forward_train", "update_running_stats", "update_running_stats"]
    assert bn_calls(backward) == ["backward", "backward"]
    decomposed = ("var_mean", "rsqrt", "native_batch_norm", "batch_norm", "var.", "mean.")
    for name in forward + backward:
        assert not any(d in name for d in decomposed), name

    mine.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))
    assert bn_calls(recorder.targets("forward")).count("forward_eval") == 2


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_backward_when_input_needs_no_grad(device):
    """A first layer: the input does not require grad; the compiled backward asks bn_cuda.backward
    for weight and bias gradients only."""
    recorder = GraphRecorder()
    torch.manual_seed(0)
    mine = bn_cuda.BatchNorm2d(3, device=device)
    eager = copy.deepcopy(mine)
    compiled = torch.compile(mine, backend=recorder.backend(), fullgraph=True)
    x = inputs((4, 3, 3, 3), device, torch.float32, seed=0)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    assert_models_equal(mine, eager)
    (call,) = [
        node
        for _, gm in recorder.graphs
        for node in gm.graph.nodes
        if node.target is torch.ops.bn_cuda.backward.default
    ]
    assert list(call.args[-1]) == [False, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_training_matches_eager(device):
    recorder = GraphRecorder()
    fmt = torch.channels_last
    _, eager, mine = model_triple(device, torch.float32, memory_format=fmt)
    compiled = torch.compile(mine, backend=recorder.backend(), fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, mine)]
    for step in range(2):
        x = inputs((3, 3, 5, 4), device, torch.float32, seed=step, memory_format=fmt)
        x_mine = x.clone().requires_grad_()
        x_eager = x.clone().requires_grad_()
        y = train_step(compiled, opts[1], x_mine)
        y_eager = train_step(eager, opts[0], x_eager)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(x_mine.grad, x_eager.grad)
        assert_models_equal(mine, eager)
    assert bn_calls(recorder.targets("backward")) == ["backward", "backward"]


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_batch_size_compiles_once(device):
    """dynamic=True: batches of 6, then 8 and 7 samples run on the graph compiled for the first
    (a recompile is an error), and the running statistics use each batch's own count, a symbolic
    value in the graph. Batch sizes differ from the spatial size so that no duck-sizing guard
    ties them together."""
    counter = CompileCounterWithBackend("inductor")
    _, eager, mine = model_triple(device, torch.float32, momentum2=None)
    compiled = torch.compile(mine, backend=counter, fullgraph=True, dynamic=True)
    for step, n in enumerate((6, 8, 7)):
        x = inputs((n, 3, 4, 4), device, torch.float32, seed=step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            y = compiled(x)
        if step == 0:
            compiles = counter.frame_count
        y_eager = eager(x)
        torch.testing.assert_close(y, y_eager)
        y.square().mean().backward()
        y_eager.square().mean().backward()
        assert_models_equal(mine, eager)
    assert counter.frame_count == compiles
    assert int(mine[1].num_batches_tracked) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_track_running_stats_false_and_affine_false(device):
    torch.manual_seed(0)
    mine = nn.Sequential(
        bn_cuda.BatchNorm2d(3, track_running_stats=False), bn_cuda.BatchNorm2d(3, affine=False, momentum=None)
    ).to(device)
    eager = copy.deepcopy(mine)
    compiled = torch.compile(mine, backend="aot_eager", fullgraph=True)
    x = inputs((4, 3, 3, 3), device, torch.float32, seed=0).requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    torch.testing.assert_close(compiled(x), eager(x_eager))
    compiled(x).sum().backward()
    eager(x_eager).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad)
    assert_models_equal(mine, eager)
    mine.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x_eager))


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_batchnorm_finetuning(device):
    """Eval-mode BatchNorm with trainable weight/bias (fine-tuning with frozen statistics): the
    compiled backward calls bn_cuda.backward with training=False; grads equal torch.nn's."""
    recorder = GraphRecorder()
    ref, eager, mine = model_triple(device, torch.float64)
    for m in (ref, eager, mine):
        m.eval()
    compiled = torch.compile(mine, backend=recorder.backend(), fullgraph=True)
    x = inputs((2, 3, 4, 4), device, torch.float64, seed=0)
    for model in (compiled, eager, ref):
        model(x).square().sum().backward()
    assert_models_equal(mine, eager)
    assert_models_equal(mine, ref)
    calls = [n for _, gm in recorder.graphs for n in gm.graph.nodes if n.target is torch.ops.bn_cuda.backward.default]
    assert len(calls) == 2
    assert all(call.args[5] is False for call in calls)
    assert bn_calls(recorder.targets("forward")) == ["forward_eval", "forward_eval"]
