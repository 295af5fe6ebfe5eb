"""``bn_cuda.functional.batch_norm``: F.batch_norm's signature and behaviour on bn_cuda's kernels.

Argument checks raise the same exception types and messages as PyTorch, and all of them run
before anything is computed or updated, so a call that fails changes no tensor.
"""

from __future__ import annotations

import numbers

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_norm"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def check_param_dtypes(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
) -> None:
    """PyTorch's dtype rules and messages. Parameters (weight, bias, running stats) share one
    dtype: the input's, or float32 for float16/bfloat16 input. Written in the Python subset that
    TorchScript compiles: the scripted module forward calls it too."""
    where = "CUDA" if input.is_cuda else "CPU"
    present: list[Tensor] = []
    for p in [weight, bias, running_mean, running_var]:
        if p is not None:
            present.append(p)
    if len(present) == 0:
        return
    if present[0].dtype != input.dtype:
        # Parameters in another dtype than the input: only float32 ones, with reduced input.
        for p in present:
            if p.dtype != torch.float32:
                raise RuntimeError("mixed dtype (" + where + "): expect parameter to have scalar type of Float")
        if input.dtype != torch.float16 and input.dtype != torch.bfloat16:
            raise RuntimeError("mixed dtype (" + where + "): all inputs must share same datatype.")
        return
    # PyTorch reports the first parameter not in the input's dtype, in the order its kernel reads them.
    ordered = [weight, running_mean, running_var, bias] if training else [weight, bias, running_mean, running_var]
    for p in ordered:
        if p is not None and p.dtype != input.dtype:
            raise RuntimeError("expected scalar type " + dtype_name(input.dtype) + " but found " + dtype_name(p.dtype))


_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name PyTorch's error messages give a dtype ("Float", "Long", "ComplexFloat", ...)."""
    if not torch.jit.is_scripting():
        return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    # TorchScript takes no dict of dtypes: the floating types (a module's parameters and buffers).
    if dtype == torch.float32:
        return "Float"
    if dtype == torch.float64:
        return "Double"
    if dtype == torch.float16:
        return "Half"
    if dtype == torch.bfloat16:
        return "BFloat16"
    return "another type"


def _type_name(value: object) -> str:
    """The type name PyTorch's argument errors print (CPython's tp_name): the bare name for
    built-in and Python-defined classes, module-qualified for compiled ones ("numpy.bool")."""
    cls = type(value)
    heap_type = bool(cls.__flags__ & (1 << 9))  # Py_TPFLAGS_HEAPTYPE
    return cls.__name__ if heap_type or cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def _is_numpy_number(value: object) -> bool:
    """A NumPy scalar number (bool, integer, floating or complex): what torch's parser takes for a
    float argument besides Python numbers and 0-dim tensors (not other numbers, e.g. Fraction)."""
    cls = type(value)
    return cls.__module__ == "numpy" and (isinstance(value, numbers.Number) or cls.__name__ in ("bool", "bool_"))


def _plainly_valid(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> bool:
    """True for a call that check_batch_norm_args's full check accepts, tested in about half its
    time (it runs on every batch-norm call); False sends the call on to that check, which finds
    the first problem in PyTorch's order. Never raises."""
    if (
        not isinstance(input, Tensor)
        or not (isinstance(eps, float) and eps > 0.0)
        or input.dim() < 2
        or input.dtype not in _SUPPORTED_DTYPES
    ):
        return False
    channels = input.shape[1]
    if channels == 0 or (training and input.numel() // channels == 1):
        return False
    device, dtype = input.device, input.dtype
    param_dtype = torch.float32 if dtype in _REDUCED_DTYPES else dtype
    if (running_mean is None or running_var is None) and (not training or running_mean is not running_var):
        return False
    first_dtype = None
    for t in (weight, bias, running_mean, running_var):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.numel() != channels or t.device != device:
            return False
        if first_dtype is None:
            first_dtype = t.dtype
            if first_dtype != dtype and first_dtype != param_dtype:
                return False
        elif t.dtype != first_dtype:
            return False
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):
        return not torch.is_grad_enabled()
    return True


def check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    group_batch: bool = False,
) -> None:
    """Raises what torch.nn.functional.batch_norm raises for these arguments (with a clear message
    where PyTorch's is opaque: a ValueError for fewer than 2 dims, an IndexError as PyTorch's for
    no channels): every rule, the first violation in PyTorch's order. The common valid call is
    let through by a quicker test first. ``group_batch``: input is one rank's part of a batch
    over a process group (SyncBatchNorm in training), which may hold one value per channel or
    none: no batch-size check here, and an empty part is checked as any other."""
    if not group_batch and _plainly_valid(input, running_mean, running_var, weight, bias, training, eps):
        return
    _check_before_parser(input, running_mean, running_var, weight, bias, training, eps, not group_batch)
    if input.numel() == 0 and not group_batch:
        # PyTorch's batch_norm checks nothing more for an empty input (batch_norm_empty) but reads
        # weight[0] and bias[0]: an IndexError where those are empty, here with a clear message.
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.numel() == 0:
                raise IndexError(_empty_parameter_message(name, input))
        return
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (N, C, ...) (got {input.dim()}D input)")
    channels = input.shape[1]
    # The rest in the order PyTorch reports them: sizes, running statistics that require grad,
    # one of them missing, devices, parameter dtypes, the input's dtype.
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            if not training:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        elif t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"The function 'native_batch_norm' is not differentiable with respect to argument '{name}'. "
                    "This input cannot have requires_grad True."
                )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, t in params.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} and {t.device}! ({name})"
            )
    if input.dtype in _SUPPORTED_DTYPES:
        check_param_dtypes(input, weight, bias, running_mean, running_var, training)
    else:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{dtype_name(input.dtype)}'")


def _check_before_parser(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    check_batch_size: bool = True,
) -> None:
    """What torch.nn.functional.batch_norm raises before anything else, in its order: its batch
    size and eps checks (on whatever it was given: a list input fails on .size() alike), then
    its parser's, for the tensor arguments (positions as in torch.batch_norm)."""
    if training and check_batch_size:
        F._verify_batch_size(input.size())
    # The comparisons F.batch_norm makes (a None eps fails on them with its TypeError); eps = 0 in
    # eval goes to torch too, whose rule for it changed between releases.
    if (eps <= 0.0) if training else (eps < 0.0 or eps == 0.0):
        _check_eps_like_torch(eps, training)
    arguments = (
        ("input", input),
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    for position, (name, t) in enumerate(arguments, start=1):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(
                f"batch_norm(): argument '{name}' (position {position}) must be Tensor, not {_type_name(t)}"
            )


def _empty_parameter_message(name: str, input: Tensor) -> str:
    if input.dim() < 2:
        return f"batch_norm: {name} is empty (input size {input.size()})"
    if input.shape[1] == 0:
        return f"batch_norm needs at least one channel, got input size {input.size()} (dimension 1 is the channels)"
    return f"{name} should contain {input.shape[1]} elements not 0"


def _check_eps_like_torch(eps: float, training: bool) -> None:
    """Raises what the installed torch.nn.functional.batch_norm raises for this eps <= 0, if
    anything. PyTorch's rule changed between releases (2.11 refuses every eps <= 0 with "must be
    positive"; later ones allow 0 in eval and word the two cases apart), so it is asked of torch
    itself, on a 2x1 input, rather than copied from one release."""
    try:
        F.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), training=training, eps=eps)
    except ValueError as error:
        raise ValueError(str(error)) from None


def batch_norm_impl(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """batch_norm with the module's extra state: when training, ``num_batches_tracked`` (if given)
    is incremented, and ``momentum=None`` averages the running statistics cumulatively (factor
    1 / num_batches_tracked, computed on the device). Nothing changes when a check fails."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    if input.numel() == 0:
        output = batch_norm_empty(input, weight, bias)
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # as nn.BatchNorm's forward counts every training call
        return output
    by_aten_ops = _function_transforms_active()
    if by_aten_ops:
        output, mean, var = _batch_norm_by_aten_ops(input, running_mean, running_var, weight, bias, training, eps)
        if not training:
            return output
        mean, var = mean.detach(), var.detach()
    elif not training:
        return torch.ops.bn_cuda.forward_eval(input, running_mean, running_var, weight, bias, eps)
    else:
        output, mean, _, var = torch.ops.bn_cuda.forward_train(input, weight, bias, eps)
    count = input.numel() // input.shape[1]
    track_batch(running_mean, running_var, mean, var, count, momentum, num_batches_tracked, by_aten_ops=by_aten_ops)
    return output


def batch_norm_empty(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What torch.batch_norm returns for an input with no elements (N, C or a spatial size 0,
    any number of dims), before any check of the other arguments' sizes, dtypes or devices: a copy
    of the input (a new tensor, so that the autograd graph reaches weight and bias), times
    weight[0], plus bias[0]. Hence an IndexError where weight or bias is empty (C = 0), and the
    result's dtype is whatever those products promote to. The running statistics stay."""
    output = input.clone()
    if weight is not None:
        output = output * weight.select(0, 0)
    if bias is not None:
        output = output + bias.select(0, 0)
    return output


def _function_transforms_active() -> bool:
    """Whether this call runs under a torch.func transform (grad, vjp, jacrev, jvp, hessian,
    vmap, functional_call under those) or forward-mode AD (a torch.autograd.forward_ad dual
    level). The ops' autograd is a C++ autograd.Function, which those cannot see through; the
    call then takes _batch_norm_by_aten_ops. Never under torch.compile, which traces the ops."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _batch_norm_by_aten_ops(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward as differentiable ATen ops, for function transforms and forward-mode AD:
    (output like input, mean, biased var), statistics in the acc dtype (float32 for
    float16/bfloat16 input, as the ops'). Batch statistics in training, the running ones in
    eval; the same formula as the kernels, (x - mean) * (invstd * weight) + bias. The input has
    elements (batch_norm_impl returns an empty one before)."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = [0, *range(2, input.dim())]
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    x = input.to(acc)
    if training:
        var, mean = torch.var_mean(x, dims, correction=0)
    else:
        assert running_mean is not None and running_var is not None  # checked
        running_mean, running_var = _running_stats_without_tangents(running_mean, running_var, input, weight, bias)
        mean, var = running_mean.to(acc), running_var.to(acc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (x - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(input.dtype), mean, var


def _primal(t: Tensor) -> Tensor:
    """t without its forward-mode tangent (a view of its values), inside a forward_ad dual level."""
    return forward_ad.unpack_dual(t).primal if forward_ad._current_level >= 0 else t


def _has_tangent(t: Tensor | None) -> bool:
    return t is not None and forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def _running_stats_without_tangents(
    running_mean: Tensor, running_var: Tensor, input: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The running statistics an eval call normalizes with, as PyTorch's forward-mode AD of
    batch_norm sees them: not differentiable. Their tangents are left out of the output's; where
    input, weight or bias carries one too, PyTorch refuses the call."""
    if not (_has_tangent(running_mean) or _has_tangent(running_var)):
        return running_mean, running_var
    if _has_tangent(input) or _has_tangent(weight) or _has_tangent(bias):
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined"
        )
    return _primal(running_mean), _primal(running_var)


def _blend_by_aten_ops(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int, factor: float | Tensor
) -> None:
    """update_running_stats's blend as ATen ops, for calls under function transforms: vmap batches
    these over stacked buffers (model ensembling: torch.func.stack_module_state and
    functional_call), as it does nn.BatchNorm's update, where the op has no batching rule. Under
    forward-mode AD only the values move: PyTorch's kernel updates them below autograd, so a
    tangent they carry stays as it was."""
    running_mean, running_var = _primal(running_mean), _primal(running_var)
    unbiased_var = var * (count / (count - 1))
    running_mean.copy_(mean * factor + running_mean * (1 - factor))
    running_var.copy_(unbiased_var * factor + running_var * (1 - factor))


def track_batch(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    count_tensor: Tensor | None = None,
    by_aten_ops: bool = False,
) -> None:
    """A training step's bookkeeping once its batch statistics (mean, biased var) are known:
    ``num_batches_tracked`` (if given) counts the batch, then the running statistics (if given)
    move toward the batch's with ``momentum``, or cumulatively when it is None. ``count`` and
    ``count_tensor`` are the values per channel, as ``torch.ops.bn_cuda.update_running_stats``
    takes them (``count_tensor``: a count known only on the device). ``by_aten_ops``: the blend
    by ATen ops instead of that op (calls under function transforms)."""
    # No no_grad() needed (it costs as much as the counter's add_): nothing here requires grad.
    # The counter is an integer buffer, running statistics that require grad were refused by the
    # checks, and the batch statistics are non-differentiable outputs.
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None or running_var is None:
        return
    if momentum is None and num_batches_tracked is None:
        momentum = 0.0  # nn.BatchNorm's factor when it has no counter to average over
    # TorchScript compiles this function for the scripted forward, where transforms never run: the
    # is_scripting() test keeps it from compiling the ATen-op branch.
    if not torch.jit.is_scripting() and by_aten_ops:
        assert count_tensor is None, "a count known only on the device takes update_running_stats"
        # The cumulative factor in the statistics' dtype, as the op's: float64 buffers keep it exact.
        factor = momentum if momentum is not None else num_batches_tracked.to(mean.dtype).reciprocal()
        _blend_by_aten_ops(running_mean, running_var, mean, var, count, factor)
        return
    tracked = num_batches_tracked if momentum is None else None
    torch.ops.bn_cuda.update_running_stats(running_mean, running_var, mean, var, count, momentum, tracked, count_tensor)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply Batch Normalization for each channel across a batch of data.

    Same signature, semantics and errors as :func:`torch.nn.functional.batch_norm`, computed by
    bn_cuda's kernels (CUDA or CPU, following ``input``'s device). ``input`` is :math:`(N, C, *)`;
    statistics are per channel over the other dimensions. In training mode the batch statistics
    normalize the input and, when ``running_mean``/``running_var`` are given, update them in place:
    :math:`\hat{x}_\text{new} = (1 - \text{momentum}) \hat{x} + \text{momentum} \cdot x_t`, with the
    unbiased variance. In evaluation mode the running statistics normalize the input.

    Args:
        input: float32, float64, float16 or bfloat16 tensor of shape :math:`(N, C, *)`, any strides;
            the output keeps its memory format (e.g. ``torch.channels_last``).
        running_mean: running mean of shape :math:`(C)` or ``None``.
        running_var: running variance of shape :math:`(C)` or ``None``.
        weight: scale :math:`\gamma` of shape :math:`(C)` or ``None`` (ones).
        bias: shift :math:`\beta` of shape :math:`(C)` or ``None`` (zeros).
        training: use batch statistics (and update the running ones) when ``True``.
        momentum: factor of the running statistics update. Default: 0.1
        eps: added to the variance for numerical stability. Default: 1e-5

    Parameters and running statistics share one dtype: the input's, or float32 for float16 and
    bfloat16 input.
    """
    # The argument types torch.batch_norm's parser takes: a bool for training; for momentum a
    # Python or NumPy number or a 0-dim tensor that does not require grad. None is nn.BatchNorm's
    # cumulative-average switch, not a value the functional form takes.
    # Those errors come after F.batch_norm's own checks (batch size, eps) and the parser's of the
    # tensor arguments, which come first in its argument list.
    if not isinstance(training, bool):
        _check_before_parser(input, running_mean, running_var, weight, bias, training, eps)
        raise TypeError(f"batch_norm(): argument 'training' (position 6) must be bool, not {_type_name(training)}")
    if isinstance(momentum, Tensor) and momentum.dim() == 0 and not momentum.requires_grad:
        momentum = float(momentum.real) if momentum.is_complex() else momentum.item()
    elif _is_numpy_number(momentum):
        momentum = float(momentum.real)  # PyTorch's parser, too, drops an imaginary part
    elif not isinstance(momentum, (int, float)):
        _check_before_parser(input, running_mean, running_var, weight, bias, training, eps)
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not {_type_name(momentum)}")
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
