"""The autograd Function behind bn_cuda.SyncBatchNorm: batch statistics shared by a process group.

Forward: every rank reduces its local batch with ``torch.ops.bn_cuda.stats`` to (count, mean,
M2), the ranks exchange these in one all-gather, and every rank merges the gathered rows the
same way in float64, so all ranks normalize with, and store as running statistics, bitwise the
same numbers. (count, mean, M2) is exchanged rather than (mean, invstd): invstd is a rounded
function of the variance, and rebuilding M2 from it loses the precision Chan's merge keeps.

Backward: every rank reduces (sum dy, sum dy * (x - mean)) locally with
``torch.ops.bn_cuda.backward_reduce``, one all-reduce sums them over the group, and
``torch.ops.bn_cuda.backward_elemt`` gives dx from the group means. grad_weight and grad_bias
are this rank's sums, as with torch.nn.SyncBatchNorm: DistributedDataParallel averages them
over ranks like every other parameter's gradient.

Ranks whose local batch is empty take part in both collectives with a neutral contribution
(count 0), so no rank waits for them forever.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._C import _functions

from .functional import track_batch
from .ops import acc_dtype

__all__ = [
    "SyncBatchNormFunction",
    "gather_stats",
    "local_stats",
    "merge_stats",
    "sync_batch_norm",
]

_ops = torch.ops.bn_cuda
_NO_DOUBLE_BACKWARD = (
    b"bn_cuda.SyncBatchNorm: the backward of a batch norm synchronized over a process group is not "
    b"differentiable (no double backward through it in training with more than one process)"
)

# torch >= 2.7 names the tensor all-gather all_gather_single; older versions all_gather_into_tensor.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def local_stats(input: Tensor) -> Tensor:
    """This rank's statistics packed for the exchange: float64 ``[count, mean (C), M2 (C)]``.

    ``stats`` returns the mean and biased variance in float64 whatever the input dtype: a mean
    rounded to float32 near 1e4 would be off by up to 5e-4, and the merge adds count times the
    square of that error to M2. An empty input gives count 0 and zeros, which the merge ignores.
    """
    count = input.numel() // input.shape[1]
    mean, var = _ops.stats(input)
    mean64, var64 = mean.to(torch.float64), var.to(torch.float64)
    count_t = torch.full((1,), count, dtype=torch.float64, device=input.device)
    return torch.cat([count_t, mean64, var64 * count])


def gather_stats(packed: Tensor, group: dist.ProcessGroup, world_size: int) -> Tensor:
    """All ranks' packed statistics, one collective: a (world_size, 2C + 1) tensor in rank order."""
    # The flat (concatenated) output form: gloo accepts only that one.
    gathered = packed.new_empty(world_size * packed.numel())
    _all_gather_tensor(gathered, packed, group=group)
    return gathered.view(world_size, packed.numel())


def merge_stats(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of the rows of ``gathered`` (rows of ``[count, mean (C), M2 (C)]``, float64).

    Returns (count, mean, var): float64, count of shape (1,), mean and the biased var of shape
    (C,). The k-way form of Chan's pairwise merge: mean = sum(n_i mean_i) / n and
    M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2). Rows with count 0 add nothing; if every count is
    0, mean and var are 0. The same rows in the same order give bitwise the same result on every
    rank.
    """
    channels = (gathered.shape[1] - 1) // 2
    counts = gathered[:, :1]
    means = gathered[:, 1 : channels + 1]
    m2s = gathered[:, channels + 1 :]
    total = counts.sum(0)
    denom = total.clamp(min=1)
    mean = (counts * means).sum(0) / denom
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total, mean, m2 / denom


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the union of the local batches of ``group``.

    Inputs: (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
    group, world_size); the running statistics (when not None) are updated in place with the
    group's mean and unbiased variance, identically on every rank. Arguments are checked by the
    caller (bn_cuda.SyncBatchNorm). Differentiable once, with respect to input, weight and bias.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        momentum: float | None,
        eps: float,
        group: dist.ProcessGroup,
        world_size: int,
    ) -> Tensor:
        gathered = gather_stats(local_stats(input), group, world_size)
        count, mean64, var64 = merge_stats(gathered)
        # CPU tensors: reading the count costs nothing (gloo has already synchronized), and it
        # lets a group holding a single value per channel fail the way nn.BatchNorm does.
        host_count = int(count.item()) if count.device.type == "cpu" else None
        if host_count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel over the "
                f"process group (local input size {input.size()})"
            )
        # With host_count the op gets the count as its int; without, nothing is read on the host:
        # the op takes the group's count as a device tensor and handles an empty group there.
        track_batch(
            running_mean,
            running_var,
            mean64,
            var64,
            host_count if host_count is not None else 0,
            momentum,
            num_batches_tracked,
            count_tensor=None if host_count is not None else count,
        )
        acc = acc_dtype(input.dtype)
        mean = mean64.to(acc)
        invstd = (var64 + eps).rsqrt().to(acc)
        output = _ops.normalize(input, mean, invstd, weight, bias)
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        with torch.no_grad():
            grads = SyncBatchNormFunction._first_order_grads(ctx, grad_output)
        if torch.is_grad_enabled() and any(ctx.needs_input_grad[:3]):
            # create_graph=True: these gradients depend on input and weight, through the group's
            # statistics, but carry no graph. Differentiating them raises (where
            # @once_differentiable would let a grad_output that does not require grad through,
            # silently dropping the second-order term).
            refuse = _functions.DelayedError(_NO_DOUBLE_BACKWARD, len(grads))
            grads = refuse(*[None if g is None else g.detach().requires_grad_() for g in grads])
        return grads

    @staticmethod
    def _first_order_grads(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, invstd, count = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        channels = input.shape[1]
        sum_dy, sum_dy_xmu = _ops.backward_reduce(grad_output, input, mean)
        grad_input = None
        # Every rank of the group takes this branch or none does (the same model on each), so
        # skipping the collective when no input gradient is wanted cannot leave a peer waiting.
        if need_input:
            sums = torch.cat([sum_dy, sum_dy_xmu]).to(torch.float64)
            dist.all_reduce(sums, group=ctx.group)
            group_means = (sums / count.clamp(min=1)).to(mean.dtype)
            mean_dy, mean_dy_xmu = group_means[:channels], group_means[channels:]
            grad_input = _ops.backward_elemt(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu)
        # Local sums, as torch.nn.SyncBatchNorm: explicit zeros on an empty rank (not None), so
        # DistributedDataParallel sees a gradient for every parameter on every rank.
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    group: dist.ProcessGroup,
    world_size: int,
) -> Tensor:
    """Training batch norm with statistics over ``group`` (see SyncBatchNormFunction)."""
    return SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group, world_size
    )
