"""PyTorch's own test samples for batch norm (the OpInfo of F.batch_norm and the ModuleInfos of
nn.BatchNorm1d/2d/3d), replayed on bn_cuda: same outputs, gradients, buffers and errors."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from torch import nn

import bn_cuda
import bn_cuda.functional as BF

common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

OPINFOS = [op for op in common_methods.op_db if op.name == "nn.functional.batch_norm"]
MODULE_INFOS = [m for m in common_modules.module_db if m.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
OURS = {nn.BatchNorm1d: bn_cuda.BatchNorm1d, nn.BatchNorm2d: bn_cuda.BatchNorm2d, nn.BatchNorm3d: bn_cuda.BatchNorm3d}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def tolerance(dtype):
    return {"rtol": 1.6e-2, "atol": 1e-2} if dtype in (torch.float16, torch.bfloat16) else {}


def clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def outcome(fn):
    try:
        return fn(), None
    except Exception as error:  # compared with PyTorch's own outcome below
        return None, error


def assert_same_error(ours, theirs):
    assert type(ours) is type(theirs), f"bn_cuda raised {ours!r}, PyTorch {theirs!r}"


def assert_same_grads(out_ours, inputs_ours, out_theirs, inputs_theirs, dtype):
    wanted = [i for i, t in enumerate(inputs_theirs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not out_theirs.requires_grad or not wanted:
        return
    grad = torch.randn_like(out_theirs)
    theirs = torch.autograd.grad(out_theirs, [inputs_theirs[i] for i in wanted], grad, allow_unused=True)
    ours = torch.autograd.grad(out_ours, [inputs_ours[i] for i in wanted], grad, allow_unused=True)
    for got, expected in zip(ours, theirs, strict=True):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opinfo", OPINFOS, ids=lambda op: op.variant_test_name or "default")
def test_opinfo_samples(opinfo, dtype, device):
    samples = list(opinfo.sample_inputs(device, dtype, requires_grad=True))
    assert samples
    for sample in samples:
        theirs_in = [clone(sample.input), *map(clone, sample.args)]
        ours_in = [clone(sample.input), *map(clone, sample.args)]
        theirs, their_error = outcome(lambda: F.batch_norm(*theirs_in, **sample.kwargs))  # noqa: B023
        ours, our_error = outcome(lambda: BF.batch_norm(*ours_in, **sample.kwargs))  # noqa: B023
        if their_error is not None or our_error is not None:
            assert_same_error(our_error, their_error)
            continue
        torch.testing.assert_close(ours, theirs, **tolerance(dtype))
        for got, expected in zip(ours_in[1:], theirs_in[1:], strict=True):  # running stats updated alike
            if isinstance(expected, torch.Tensor):
                torch.testing.assert_close(got, expected, **tolerance(dtype))
        assert_same_grads(ours, ours_in, theirs, theirs_in, dtype)


def module_cases():
    for info in MODULE_INFOS:
        for training in (True, False):
            yield pytest.param(info, training, id=f"{info.module_cls.__name__}-{'train' if training else 'eval'}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("info", "training"), list(module_cases()))
def test_module_info_samples(info, training, dtype, device):
    module_inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=training)
    assert module_inputs
    for module_input in module_inputs:
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        theirs_m = info.module_cls(*args, **kwargs).to(device=device, dtype=dtype).train(training)
        ours_m = OURS[info.module_cls](*args, **kwargs).to(device=device, dtype=dtype).train(training)
        ours_m.load_state_dict(theirs_m.state_dict())
        forward = module_input.forward_input
        theirs_in = [clone(a) for a in forward.args]
        ours_in = [clone(a) for a in forward.args]
        theirs = theirs_m(*theirs_in, **forward.kwargs)
        ours = ours_m(*ours_in, **forward.kwargs)
        torch.testing.assert_close(ours, theirs)
        for name, expected in theirs_m.state_dict().items():
            torch.testing.assert_close(ours_m.state_dict()[name], expected, msg=name)
        params_theirs, params_ours = list(theirs_m.parameters()), list(ours_m.parameters())
        assert_same_grads(ours, ours_in + params_ours, theirs, theirs_in + params_theirs, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda info: info.module_cls.__name__)
def test_module_info_error_samples(info, device):
    errors = list(
        info.module_error_inputs_func(info, device=device, dtype=torch.float32, requires_grad=False, training=True)
    )
    assert errors
    for error_input in errors:
        module_input = error_input.module_error_input
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        module = OURS[info.module_cls](*args, **kwargs).to(device)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            module(*module_input.forward_input.args, **module_input.forward_input.kwargs)
