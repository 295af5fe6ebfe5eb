"""Fake (meta) kernels and autograd formulas for the ``torch.ops.bn_cuda`` operators.

The schemas and their contracts are in csrc/ops.cpp; the CPU and CUDA kernels are registered by
the compiled extension. Fake kernels give torch.compile / FakeTensor the output shapes, dtypes
and strides without running anything. Autograd is registered on the forward ops so that
``torch.ops.bn_cuda.forward_train`` etc. are differentiable wherever they are called from: here
for stats and normalize, in csrc/autograd.cpp for forward_train and forward_eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = ["acc_dtype"]

_ops = torch.ops.bn_cuda


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: Tensor) -> torch.memory_format:
    """The format the kernels write outputs dense in (csrc/op_checks.h, view_format): 4D/5D only;
    on the CPU the one the input is dense in (contiguous first), else suggest_memory_format; an
    empty input channels last where its channels' stride is 1."""
    if x.dim() not in (4, 5):
        return torch.contiguous_format
    channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.numel() == 0:
        return channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format
    if x.device.type == "cpu":
        if x.is_contiguous():
            return torch.contiguous_format
        if x.is_contiguous(memory_format=channels_last):
            return channels_last
    return suggest_memory_format(x)


def _grad_input_format(x: Tensor, grad_output: Tensor) -> torch.memory_format:
    """The format of grad_input (csrc/op_checks.h, grad_input_format): on the CPU, where
    _memory_format(x) is not x's suggest_memory_format, it holds only where grad_output is dense
    with the same suggested format as x (PyTorch's CPU backward)."""
    fmt = _memory_format(x)
    if x.device.type != "cpu" or x.dim() not in (4, 5) or fmt == suggest_memory_format(x):
        return fmt
    dense = grad_output.is_contiguous() or grad_output.is_contiguous(memory_format=fmt)
    return fmt if dense and suggest_memory_format(grad_output) == suggest_memory_format(x) else suggest_memory_format(x)


def _empty_like_input(x: Tensor, memory_format: torch.memory_format | None = None) -> Tensor:
    fmt = _memory_format(x) if memory_format is None else memory_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _channel_stat(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


def _channel_shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


# ---- fake kernels -------------------------------------------------------------------------------
# A call with any tensor on the meta device is routed here even when the others are real, so
# these check devices like the real kernels do instead of returning uninitialised outputs.


def _check_devices(op: str, anchor_name: str, anchor: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            torch._check(
                t.device == anchor.device,
                lambda name=name, t=t: f"bn_cuda.{op}: {name} is on {t.device} but {anchor_name} is on {anchor.device}",
            )


@torch.library.register_fake("bn_cuda::stats")
def _stats_fake(input: Tensor) -> tuple[Tensor, Tensor]:
    stat = input.new_empty((input.shape[1],), dtype=torch.float64)
    return stat, stat.clone()


@torch.library.register_fake("bn_cuda::normalize")
def _normalize_fake(input, mean, invstd, weight, bias) -> Tensor:
    _check_devices("normalize", "input", input, mean=mean, invstd=invstd, weight=weight, bias=bias)
    return _empty_like_input(input)


@torch.library.register_fake("bn_cuda::forward_train")
def _forward_train_fake(input, weight, bias, eps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_devices("forward_train", "input", input, weight=weight, bias=bias)
    return _empty_like_input(input), _channel_stat(input), _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bn_cuda::forward_eval")
def _forward_eval_fake(input, running_mean, running_var, weight, bias, eps) -> Tensor:
    _check_devices(
        "forward_eval", "input", input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )
    return _empty_like_input(input)


@torch.library.register_fake("bn_cuda::backward_reduce")
def _backward_reduce_fake(grad_output, input, mean) -> tuple[Tensor, Tensor]:
    _check_devices("backward_reduce", "input", input, grad_output=grad_output, mean=mean)
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bn_cuda::backward_elemt")
def _backward_elemt_fake(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu) -> Tensor:
    _check_devices(
        "backward_elemt",
        "input",
        input,
        grad_output=grad_output,
        mean=mean,
        invstd=invstd,
        weight=weight,
        mean_dy=mean_dy,
        mean_dy_xmu=mean_dy_xmu,
    )
    return _empty_like_input(input, _grad_input_format(input, grad_output))


@torch.library.register_fake("bn_cuda::backward")
def _backward_fake(
    grad_output, input, mean, invstd, weight, training: bool, output_mask: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    _check_devices("backward", "input", input, grad_output=grad_output, mean=mean, invstd=invstd, weight=weight)
    param_dtype = weight.dtype if weight is not None else acc_dtype(input.dtype)
    channels = input.shape[1]
    grad_input = (
        _empty_like_input(input, _grad_input_format(input, grad_output)) if output_mask[0] else input.new_empty((0,))
    )
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("bn_cuda::update_running_stats")
def _update_running_stats_fake(
    running_mean, running_var, mean, var, count, momentum, num_batches_tracked, count_tensor=None
) -> None:
    _check_devices(
        "update_running_stats",
        "mean",
        mean,
        running_mean=running_mean,
        running_var=running_var,
        var=var,
        num_batches_tracked=num_batches_tracked,
        count_tensor=count_tensor,
    )


# ---- autograd ------------------------------------------------------------------------------------
# forward_train and forward_eval, which every module call runs, have their autograd in C++
# (csrc/autograd.cpp); stats and normalize have theirs here.


def _normalize_setup(ctx, inputs, output) -> None:
    input, mean, invstd, weight, bias = inputs
    ctx.save_for_backward(input, mean, invstd, weight)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _normalize_backward(ctx, grad_output):
    # y = (x - mean) * invstd * w + b with mean and invstd as independent inputs.
    input, mean, invstd, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():
        return _normalize_grads_by_reference(ctx, grad_output)
    acc = acc_dtype(input.dtype)
    w = weight.to(acc) if weight is not None else torch.ones_like(invstd, dtype=acc)
    sum_dy, sum_dy_xmu = _ops.backward_reduce(grad_output, input, mean)
    grad_input = None
    if needs[0]:
        grad_input, _, _ = _ops.backward(grad_output, input, mean, invstd, weight, False, [True, False, False])
    grad_mean = (-invstd.to(acc) * w * sum_dy).to(mean.dtype) if needs[1] else None
    grad_invstd = (w * sum_dy_xmu).to(invstd.dtype) if needs[2] else None
    grad_weight = (invstd.to(acc) * sum_dy_xmu).to(weight.dtype) if needs[3] else None
    grad_bias = sum_dy.to(ctx.bias_dtype) if needs[4] else None
    return grad_input, grad_mean, grad_invstd, grad_weight, grad_bias


def _normalize_grads_by_reference(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of normalize from differentiable PyTorch ops (double backward)."""
    input, mean, invstd, weight = ctx.saved_tensors
    acc = acc_dtype(input.dtype)
    shape = _channel_shape(input)
    inputs = (input, mean, invstd, weight)
    wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t is not None]
    y = (input.to(acc) - mean.to(acc).reshape(shape)) * invstd.to(acc).reshape(shape)
    if weight is not None:
        y = y * weight.to(acc).reshape(shape)
    grads = torch.autograd.grad(
        y, [inputs[i] for i in wanted], grad_output.to(acc), create_graph=True, allow_unused=True
    )
    out: list[Tensor | None] = [None] * 5
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g.to(inputs[i].dtype) if g is not None else None
    if ctx.needs_input_grad[4]:
        out[4] = grad_output.to(acc).sum(_reduce_dims(input)).to(ctx.bias_dtype)
    return tuple(out)


torch.library.register_autograd("bn_cuda::normalize", _normalize_backward, setup_context=_normalize_setup)


def _stats_setup(ctx, inputs, output) -> None:
    (input,) = inputs
    mean, _ = output
    ctx.save_for_backward(input, mean)


def _stats_backward(ctx, grad_mean, grad_var):
    # mean = sum(x) / n, var = sum((x - mean)^2) / n:
    # dx = grad_mean / n + grad_var * 2 (x - mean) / n.
    input, mean = ctx.saved_tensors
    acc = acc_dtype(input.dtype)
    shape = _channel_shape(input)
    count = max(input.numel() // input.shape[1], 1)
    centred = input.to(acc) - mean.reshape(shape)
    grad = (grad_mean.reshape(shape) + 2 * grad_var.reshape(shape) * centred) / count
    return grad.to(input.dtype)


torch.library.register_autograd("bn_cuda::stats", _stats_backward, setup_context=_stats_setup)
