"""bn_cuda.BatchNorm1d/2d/3d: nn.BatchNorm1d/2d/3d computed by bn_cuda's kernels, and convert_model.

Each class subclasses its torch.nn counterpart and only replaces ``forward``: the constructor,
parameters, buffers, state_dict (and loading checkpoints without ``num_batches_tracked``),
``reset_parameters``, ``extra_repr`` and ``isinstance(m, nn.BatchNorm2d)`` are PyTorch's own.
Differences, all deliberate:

- ``momentum=None`` (cumulative average) computes its factor on the device, so it runs under
  ``torch.compile(fullgraph=True)`` and CUDA graphs;
- a call that raises changes nothing (PyTorch increments ``num_batches_tracked`` first);
- under ``torch.utils.checkpoint(use_reentrant=False)``, with this module the last layer of the
  checkpointed function that saves tensors, a training step updates the running statistics
  once, as without checkpointing (the recomputation stops before the update; nn's kernel updates
  them during it too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import batch_norm_empty, batch_norm_impl, check_param_dtypes, track_batch
from .sync_batchnorm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_model", "revert_model"]


def module_batch_norm(
    input: Tensor,
    input_dims: tuple[int, ...],
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """The forward of bn_cuda.BatchNorm*d, as one function of the module's state, so that
    torch.fx traces it as a single call (see torch.fx.wrap below). An empty ``input_dims``: the
    caller has checked the input's dimensions."""
    if input_dims and input.dim() not in input_dims:
        expected = " or ".join(f"{d}D" for d in input_dims)
        raise ValueError(f"expected {expected} input (got {input.dim()}D input)")
    # Batch statistics in training, and in eval when there are no running statistics.
    bn_training = training or (running_mean is None and running_var is None)
    # Running statistics are read in eval and updated in training when they are tracked.
    use_buffers = not training or track_running_stats
    return batch_norm_impl(
        input,
        running_mean if use_buffers else None,
        running_var if use_buffers else None,
        weight,
        bias,
        bn_training,
        momentum,
        eps,
        num_batches_tracked if training and track_running_stats else None,
    )


# torch.fx treats torch.nn modules as leaves but traces through others; recording this call as
# one node keeps FX-based tools (feature extraction, FX quantization) working on converted models.
torch.fx.wrap("module_batch_norm")


# nn's own input-dimension checks, which the forward's built-in check stands for.
_NN_INPUT_CHECKS = tuple(cls._check_input_dim for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


class _BatchNormForward:
    """The forward shared by the three classes (combined with an nn.BatchNorm*d base)."""

    _input_dims: tuple[int, ...]

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._eager_forward(input)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """The forward under TorchScript (torch.jit.script of a model holding this module): the
        same ops in the same order as module_batch_norm, with nn.BatchNorm's own scriptable checks
        (input dims, one value per channel in training) in front; the remaining argument checks
        are the ops' own, raised as RuntimeError."""
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        counter = self.num_batches_tracked if self.training and self.track_running_stats else None
        if input.numel() == 0:
            if bn_training:
                F._verify_batch_size(input.size())
            output = batch_norm_empty(input, self.weight, self.bias)
            if counter is not None:
                counter.add_(1)
            return output
        check_param_dtypes(input, self.weight, self.bias, running_mean, running_var, bn_training)
        if not bn_training:
            if running_mean is None or running_var is None:
                raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
            return torch.ops.bn_cuda.forward_eval(input, running_mean, running_var, self.weight, self.bias, self.eps)
        F._verify_batch_size(input.size())
        output, mean, _, var = torch.ops.bn_cuda.forward_train(input, self.weight, self.bias, self.eps)
        track_batch(running_mean, running_var, mean, var, input.numel() // input.size(1), self.momentum, counter)
        return output

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        input_dims = self._input_dims
        if getattr(self._check_input_dim, "__func__", None) not in _NN_INPUT_CHECKS:
            # Replaced, by a subclass or on the instance: nn's forward calls it, so it decides
            # which inputs pass.
            self._check_input_dim(input)
            input_dims = ()
        return module_batch_norm(
            input,
            input_dims,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked,
        )


_ARGS_DOC = r"""
    Args:
        num_features: :math:`C` from an expected input of size {shape}
        eps: a value added to the denominator for numerical stability. Default: 1e-5
        momentum: the value used for the running_mean and running_var computation. Can be set
            to ``None`` for cumulative moving average (i.e. simple average). Default: 0.1
        affine: when ``True``, this module has learnable affine parameters. Default: ``True``
        track_running_stats: when ``True``, this module tracks the running mean and variance;
            when ``False`` it keeps none and uses batch statistics in both training and eval
            modes. Default: ``True``
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: when ``False``, the layer learns no additive bias (only relevant if ``affine``).
            Default: ``True``

    Shape:
        - Input: {shape}
        - Output: same shape and memory format as the input
"""


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    _input_dims = (2, 3)
    __doc__ = (
        r"""Batch Normalization over a 2D or 3D input, on bn_cuda's kernels.

    A drop-in for :class:`torch.nn.BatchNorm1d` (same arguments, state_dict and behaviour):

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta
"""
        + _ARGS_DOC.format(shape=r":math:`(N, C)` or :math:`(N, C, L)`")
        + r"""
    Examples::

        >>> m = bn_cuda.BatchNorm1d(100)
        >>> output = m(torch.randn(20, 100))
    """
    )


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    _input_dims = (4,)
    __doc__ = (
        r"""Batch Normalization over a 4D input, on bn_cuda's kernels.

    A drop-in for :class:`torch.nn.BatchNorm2d` (same arguments, state_dict and behaviour):

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The mean and standard deviation are computed per channel over the batch and spatial
    dimensions; the biased variance normalizes, the unbiased one updates ``running_var``.
    NCHW and ``torch.channels_last`` inputs are both native; the output (and the input's
    gradient) keep the input's memory format.
"""
        + _ARGS_DOC.format(shape=r":math:`(N, C, H, W)`")
        + r"""
    Examples::

        >>> m = bn_cuda.BatchNorm2d(100)
        >>> output = m(torch.randn(20, 100, 35, 45))
    """
    )


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    _input_dims = (5,)
    __doc__ = (
        r"""Batch Normalization over a 5D input, on bn_cuda's kernels.

    A drop-in for :class:`torch.nn.BatchNorm3d` (same arguments, state_dict and behaviour):

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta
"""
        + _ARGS_DOC.format(shape=r":math:`(N, C, D, H, W)`")
        + r"""
    Examples::

        >>> m = bn_cuda.BatchNorm3d(100)
        >>> output = m(torch.randn(20, 100, 35, 45, 10))
    """
    )


_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert_model(module: nn.Module, sync: bool = False, process_group: Any | None = None) -> nn.Module:
    """Make every ``nn.BatchNorm1d/2d/3d`` in ``module`` (itself included) a bn_cuda module.

    The conversion is in place and keeps everything: the same parameter and buffer tensors (an
    optimizer built before the call keeps working), device, dtype, train/eval mode, hooks and
    attributes. Only modules whose type is exactly nn.BatchNorm1d/2d/3d are converted;
    subclasses (user-defined, SyncBatchNorm, lazy modules) are left as they are.

    With ``sync=True``, every batch-norm layer (nn or bn_cuda BatchNorm1d/2d/3d, nn.SyncBatchNorm)
    becomes a new :class:`bn_cuda.SyncBatchNorm` over ``process_group`` (default: the whole world)
    holding the same parameter and buffer tensors, as
    :meth:`bn_cuda.SyncBatchNorm.convert_sync_batchnorm` does. A batch-norm ``module`` itself is
    then replaced, not converted in place: use the return value.

    Returns:
        ``module`` (or its replacement), for chaining: ``model = bn_cuda.convert_model(model)``.
    """
    if sync:
        return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if process_group is not None:
        raise ValueError("convert_model: process_group is only used with sync=True")
    for m in module.modules():
        replacement = _REPLACEMENTS.get(type(m))
        if replacement is not None:
            # The bn_cuda classes add no state to their bases, so changing the class is exact.
            m.__class__ = replacement
    return module


def revert_model(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_model`: every module whose type is exactly bn_cuda's BatchNorm1d/2d/3d
    (``module`` itself included) becomes torch.nn's again, in place, keeping its parameter and
    buffer tensors, mode, hooks and attributes.

    For tools that recognise batch norm by exact type rather than ``isinstance``:
    ``torch.ao.quantization.fuse_modules``/``fuse_modules_qat`` and quantization flows that match
    ``nn.BatchNorm2d``. bn_cuda.SyncBatchNorm modules are left as they are.

    Returns:
        ``module``, for chaining: ``model = bn_cuda.revert_model(model)``.
    """
    originals = {bn: torch_cls for torch_cls, bn in _REPLACEMENTS.items()}
    for m in module.modules():
        original = originals.get(type(m))
        if original is not None:
            m.__class__ = original
    return module
