"""bn_cuda.SyncBatchNorm: torch.nn.SyncBatchNorm computed by bn_cuda's kernels, on CPU and CUDA.

The class derives from nn.SyncBatchNorm's own base (``_BatchNorm``) and repeats its small
constructor and input checks, so parameters, buffers, state_dict, ``reset_parameters`` and
``extra_repr`` are PyTorch's. It deliberately does not derive from nn.SyncBatchNorm:
DistributedDataParallel refuses any CPU model holding an nn.SyncBatchNorm instance ("SyncBatchNorm
layers only work with GPU modules"), and running on the CPU with gloo is the point of this class.
The cross-process computation is in sync_function.py.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import batch_norm_impl, check_batch_norm_args
from .sync_function import sync_batch_norm

__all__ = ["SyncBatchNorm"]


# PyTorch's batch-norm modules take `bias=False` (an affine scale without shift) only in recent
# releases; with an older torch, SyncBatchNorm refuses it as nn.SyncBatchNorm does.
_BATCHNORM_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def _bias_argument(bias: bool) -> dict[str, bool]:
    """The `bias` keyword for _BatchNorm.__init__: passed where torch has it; with a torch that has
    none, True is its only behaviour and False raises the TypeError torch's modules raise."""
    if _BATCHNORM_TAKES_BIAS:
        return {"bias": bias}
    if not bias:
        raise TypeError("SyncBatchNorm.__init__() got an unexpected keyword argument 'bias'")
    return {}


class SyncBatchNorm(_BatchNorm):
    r"""Batch Normalization over a batch split across processes, on bn_cuda's kernels.

    A drop-in for :class:`torch.nn.SyncBatchNorm` (same arguments, state_dict and results) that
    also runs on the CPU (gloo) besides CUDA (NCCL):

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, the mean and variance are computed per channel over the batch and spatial
    dimensions of the inputs of all processes of ``process_group`` together, as if their batches
    were concatenated. Each process contributes (count, mean, M2) of its local batch, exchanged in
    one all-gather and merged in float64 in rank order, so every process normalizes with, and
    stores as running statistics, bitwise the same values. The backward pass sums the two
    per-channel gradient reductions in one all-reduce. Local batches may differ in size, and may
    be empty (the process still takes part in the collectives, so none of them waits forever).

    Without synchronization (evaluation mode, ``torch.distributed`` not initialized, or a
    process group of one process) it is bn_cuda's ordinary batch norm.

    Differences from :class:`torch.nn.SyncBatchNorm`, all deliberate:

    - CPU tensors are accepted in training (PyTorch raises), and ``isinstance(m,
      nn.SyncBatchNorm)`` is ``False``, because DistributedDataParallel rejects CPU models
      holding an ``nn.SyncBatchNorm``;
    - statistics are exchanged as (count, mean, M2) in float64 rather than (mean, invstd), so the
      merged variance keeps its precision for large means (mean 1e4, std 1e-2 in float32);
    - ``momentum=None`` computes its factor on the device (no host synchronization), and a call
      that raises changes nothing (PyTorch increments ``num_batches_tracked`` first);
    - a process whose local batch is empty gets zero ``weight``/``bias`` gradients rather than
      none, so DistributedDataParallel finds a gradient for every parameter on every rank.

    As with :class:`torch.nn.SyncBatchNorm`, ``weight.grad`` and ``bias.grad`` are each process's
    share (sums over its local batch); DistributedDataParallel averages them over processes.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`
        eps: a value added to the denominator for numerical stability. Default: ``1e-5``
        momentum: the value used for the running_mean and running_var computation. Can be set
            to ``None`` for cumulative moving average (i.e. simple average). Default: 0.1
        affine: when ``True``, this module has learnable affine parameters. Default: ``True``
        track_running_stats: when ``True``, this module tracks the running mean and variance;
            when ``False`` it keeps none and uses batch statistics in both training and eval
            modes. Default: ``True``
        process_group: synchronization of statistics happens within each process group
            individually. Default: the whole world (``torch.distributed.group.WORLD``)
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: when ``False``, the layer learns no additive bias (only relevant if ``affine``).
            Default: ``True``

    Shape:
        - Input: :math:`(N, C, +)`
        - Output: :math:`(N, C, +)` (same shape and memory format as input)

    Examples::

        >>> # xdoctest: +SKIP("distributed")
        >>> torch.distributed.init_process_group("gloo")  # or "nccl" for CUDA tensors
        >>> m = bn_cuda.SyncBatchNorm(100)
        >>> output = m(torch.randn(20, 100, 35, 45))
        >>> # models built with nn.BatchNorm*d:
        >>> model = bn_cuda.SyncBatchNorm.convert_sync_batchnorm(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **_bias_argument(bias)
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_group(self) -> tuple[Any, int] | None:
        """The process group to synchronize over and its size, or None when there is none to
        synchronize with (torch.distributed not initialized, or a group of one process)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        # Batch statistics in training, and in eval when there are no running statistics.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are read in eval and updated in training when they are tracked.
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        num_batches_tracked = self.num_batches_tracked if self.training and self.track_running_stats else None
        # As nn.SyncBatchNorm: statistics are shared in training only, never in eval.
        sync = self._sync_group() if self.training else None
        if sync is None:
            return batch_norm_impl(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                self.momentum,
                self.eps,
                num_batches_tracked,
            )
        group, world_size = sync
        # Every check but "more than 1 value per channel", which concerns the whole group (a rank
        # may hold one value or none), on every rank, its part of the batch empty or not.
        check_batch_norm_args(
            input, running_mean, running_var, self.weight, self.bias, True, self.eps, group_batch=True
        )
        return sync_batch_norm(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            num_batches_tracked,
            self.momentum,
            self.eps,
            group,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        r"""Convert every ``BatchNorm*d`` layer of ``module`` to :class:`bn_cuda.SyncBatchNorm`.

        Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: every
        ``torch.nn.modules.batchnorm._BatchNorm`` (``nn.BatchNorm1d/2d/3d``,
        ``bn_cuda.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``) is replaced by a new
        ``bn_cuda.SyncBatchNorm`` holding the same parameter and buffer tensors (an optimizer
        built before the call keeps working), with the same hyperparameters and train/eval mode.

        Args:
            module: module containing one or more ``BatchNorm*d`` layers
            process_group: process group to scope synchronization, default is the whole world

        Returns:
            ``module`` with its batch-norm layers converted. If ``module`` itself is a batch-norm
            layer, a new ``bn_cuda.SyncBatchNorm`` is returned instead.

        Example::

            >>> # xdoctest: +SKIP("distributed")
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> model = bn_cuda.SyncBatchNorm.convert_sync_batchnorm(model)
            >>> ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        """
        module_output = module
        if isinstance(module, _BatchNorm):
            module_output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                # A module without bias only exists where torch has the argument.
                **({"bias": module.bias is not None} if _BATCHNORM_TAKES_BIAS else {}),
            )
            if module.affine:
                module_output.weight = module.weight
                module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module_output
