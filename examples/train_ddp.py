"""Train a small ResNet-style model with DistributedDataParallel and bn_cuda.SyncBatchNorm.

    torchrun --nproc_per_node=2 examples/train_ddp.py            # gloo on the CPU, NCCL on GPUs
    torchrun --nproc_per_node=2 examples/train_ddp.py --device cpu --steps 5

(bn_cuda must be importable: installed, or the repository root on PYTHONPATH for an in-place
build.) Data are synthetic: random images labelled by a fixed random "teacher", a different
shard and a different batch size on every rank, so batch statistics really differ between
ranks. Rank 0 prints the loss averaged over ranks at each step; at the end every rank checks
that the running statistics of every SyncBatchNorm layer are bitwise identical on all ranks.
"""

from __future__ import annotations

import argparse
import inspect
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bn_cuda.sync_batchnorm import SyncBatchNorm


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, and a shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BasicBlock(16, 16, 1),
        BasicBlock(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


_OFFSET = torch.tensor([0.5, -1.0, 3.0]).view(1, 3, 1, 1)
_SCALE = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)


def synthetic_batch(batch: int, size: int, generator: torch.Generator, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Images with a per-channel offset and scale (so the statistics matter), labelled by the
    teacher from each image's deviation from the offset."""
    noise = torch.randn(batch, 3, size, size, generator=generator)
    labels = (noise.mean((2, 3)) @ teacher).argmax(1)
    return noise * _SCALE + _OFFSET, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="rank r uses batch-size + r samples")
    parser.add_argument("--image-size", type=int, default=16)
    args = parser.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = SyncBatchNorm.convert_sync_batchnorm(small_resnet()).to(device)
    # No buffer broadcast: DDP would otherwise copy rank 0's running statistics to every rank
    # before each forward, and the check at the end would prove nothing. (torch >= 2.14 names
    # the switch forward_sync_buffers.)
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None, **no_buffer_sync)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    teacher = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    if rank == 0:
        print(
            f"{world} ranks, backend {dist.get_backend()}, device {device.type}, batch sizes "
            f"{[args.batch_size + r for r in range(world)]}"
        )
    for step in range(args.steps):
        x, labels = synthetic_batch(args.batch_size + rank, args.image_size, data, teacher)
        x, labels = x.to(device), labels.to(device)
        loss = F.cross_entropy(ddp(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}")

    # Every SyncBatchNorm updated its running statistics from the same merged batch statistics.
    identical = True
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SyncBatchNorm)]
    for name, m in layers:
        mine = torch.cat([m.running_mean, m.running_var, m.num_batches_tracked.to(m.running_mean.dtype).view(1)])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        same = all(torch.equal(t, everyone[0]) for t in everyone)
        identical &= same
        if not same and rank == 0:
            print(f"running statistics of {name} differ across ranks")
    if rank == 0:
        print(f"running statistics of {len(layers)} SyncBatchNorm layers identical on all {world} ranks: {identical}")
    dist.destroy_process_group()
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
