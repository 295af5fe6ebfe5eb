"""bn_cuda.SyncBatchNorm: statistics over a process group equal single-process batch norm on the
concatenated batch.

The multi-process checks run in groups of 2 and 3 ranks that this file starts as subprocesses of
itself (gloo over 127.0.0.1). Starting a process that imports torch costs seconds, so each group
runs all of its checks once (module-scoped fixture) and every check is reported as its own test.
A group is bounded in time: the collectives time out, and a group that does not finish is
killed, its checks failing with the ranks' output. The merge, the running-statistics update and
the module's single-process behaviour are tested in this process.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import BATCHNORM_TAKES_BIAS, DEVICES, HAS_CUDA
from torch import nn

import bn_cuda
from bn_cuda.functional import track_batch
from bn_cuda.sync_batchnorm import SyncBatchNorm
from bn_cuda.sync_function import local_stats, merge_stats

REPO_ROOT = Path(__file__).resolve().parent.parent
GROUP_TIMEOUT_S = 150  # a whole group, torch import included, on a loaded 2-core machine
COLLECTIVE_TIMEOUT_S = 30  # a rank waiting on a peer that died or diverged gives up after this

# ---- checks run inside a group ------------------------------------------------------------------
# Each check runs on every rank, performs the same collectives in the same order on all of them,
# and asserts only after its last collective, so a failed assertion leaves the group in step
# and the next check can run.


class Rank:
    """What a check knows about the group it runs in: its rank, the group's size and the device
    its tensors live on (cpu with gloo, cuda:rank with NCCL)."""

    def __init__(self, rank: int, world: int, device: str) -> None:
        self.rank = rank
        self.world = world
        self.device = torch.device(device)


def reference_class(dim: int) -> tuple[type[nn.Module], type[nn.Module]]:
    """(torch.nn, bn_cuda) batch norm classes for inputs of ``dim`` dims."""
    if dim in (2, 3):
        return nn.BatchNorm1d, bn_cuda.BatchNorm1d
    if dim == 4:
        return nn.BatchNorm2d, bn_cuda.BatchNorm2d
    return nn.BatchNorm3d, bn_cuda.BatchNorm3d


def init_affine(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=g))


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def compare_with_single_process(
    me: Rank,
    counts: list[int],
    dtype: torch.dtype,
    *,
    spatial: tuple[int, ...] = (3, 4),
    channels: int = 3,
    memory_format: torch.memory_format = torch.contiguous_format,
    momentum: float | None = 0.1,
    affine: bool = True,
    steps: int = 2,
    mean: float = 0.5,
    std: float = 2.0,
    tol: dict[str, float] | None = None,
    group=None,
    group_ranks: list[int] | None = None,
) -> None:
    """Train a SyncBatchNorm for ``steps`` steps, rank r of the group holding counts[r] samples of a
    global batch; compare outputs, input grads, weight/bias grads (summed over the group) and
    running statistics with nn and bn_cuda batch norm trained on the whole batch, check each
    rank's weight/bias grads are its own share (as nn.SyncBatchNorm's), and check the running
    statistics are bitwise equal on every rank."""
    group_ranks = group_ranks if group_ranks is not None else list(range(me.world))
    index = group_ranks.index(me.rank)
    start, stop = sum(counts[:index]), sum(counts[: index + 1])
    shape = (sum(counts), channels, *spatial)
    nn_cls, bn_cls = reference_class(len(shape))
    kwargs = {"momentum": momentum, "affine": affine, "dtype": dtype, "device": me.device}
    refs = [nn_cls(channels, **kwargs), bn_cls(channels, **kwargs)]
    sync = SyncBatchNorm(channels, process_group=group, **kwargs)
    for m in [*refs, sync]:
        init_affine(m, seed=1)
    g = torch.Generator().manual_seed(2)
    results = []
    dims = [0, *range(2, len(shape))]
    own_grads = {"weight": 0.0, "bias": 0.0}
    for _ in range(steps):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(me.device, dtype)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(me.device, dtype)
        if len(shape) in (4, 5):
            x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
        expected = []
        for ref in refs:
            xr = x.clone().requires_grad_()
            y = ref(xr)
            y.backward(dy)
            expected.append((y[start:stop], xr.grad[start:stop]))
        # This rank's share of the weight/bias gradients: its samples' terms of the global sums.
        var, mu = torch.var_mean(x.double(), dims, correction=0, keepdim=True)
        dy_local = dy.double()[start:stop]
        own_grads["weight"] += (dy_local * (x.double()[start:stop] - mu) * (var + sync.eps).rsqrt()).sum(dims)
        own_grads["bias"] += dy_local.sum(dims)
        xl = x[start:stop].clone(memory_format=memory_format if len(shape) in (4, 5) else torch.preserve_format)
        xl.requires_grad_()
        y = sync(xl)
        y.backward(dy[start:stop])
        results.append((xl, y, expected))
    grads = {}
    for name in ("weight", "bias"):
        p = getattr(sync, name)
        if p is not None:
            total = p.grad.clone()
            dist.all_reduce(total, group=group)
            grads[name] = total
    stats_everywhere = all_gather(torch.cat([sync.running_mean, sync.running_var]), group=group)

    tol = tol or {}
    for xl, y, expected in results:
        assert y.shape == xl.shape and y.dtype == dtype
        if len(shape) in (4, 5):
            assert y.is_contiguous(memory_format=memory_format)
            assert xl.grad.is_contiguous(memory_format=memory_format)
        for y_ref, dx_ref in expected:
            torch.testing.assert_close(y, y_ref, **tol)
            torch.testing.assert_close(xl.grad, dx_ref, **tol)
    for name in grads:
        torch.testing.assert_close(getattr(sync, name).grad, own_grads[name].to(dtype), msg=name, **tol)
    for ref in refs:
        for name, total in grads.items():
            torch.testing.assert_close(total, getattr(ref, name).grad, msg=name, **tol)
        torch.testing.assert_close(sync.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(sync.running_var, ref.running_var, **tol)
        assert torch.equal(sync.num_batches_tracked, ref.num_batches_tracked)
    assert all(torch.equal(s, stats_everywhere[0]) for s in stats_everywhere), "running stats differ across ranks"


TIGHT64 = {"rtol": 1e-10, "atol": 1e-10}


def check_float64_uneven(me: Rank) -> None:
    counts = [3, 5, 2][: me.world]
    compare_with_single_process(me, counts, torch.float64, tol=TIGHT64)


def check_float32_uneven(me: Rank) -> None:
    counts = [4, 1, 3][: me.world]
    compare_with_single_process(me, counts, torch.float32)


def check_channels_last(me: Rank) -> None:
    counts = [2, 3, 1][: me.world]
    compare_with_single_process(me, counts, torch.float32, memory_format=torch.channels_last)
    compare_with_single_process(me, counts, torch.float64, memory_format=torch.channels_last, tol=TIGHT64)


def check_momentum_none(me: Rank) -> None:
    counts = [3, 2, 4][: me.world]
    compare_with_single_process(me, counts, torch.float64, momentum=None, steps=3, tol=TIGHT64)


def check_empty_rank(me: Rank) -> None:
    counts = [0, 5, 3][: me.world] if me.world == 3 else [5, 0]
    compare_with_single_process(me, counts, torch.float64, tol=TIGHT64)
    compare_with_single_process(me, counts, torch.float32, affine=False, spatial=(2,))


def check_single_value_rank(me: Rank) -> None:
    # One value per channel on a rank is fine when the group holds more (nn.SyncBatchNorm too).
    counts = [1, 0, 2][: me.world] if me.world == 3 else [1, 3]
    compare_with_single_process(me, counts, torch.float64, spatial=(), tol=TIGHT64)


def check_reduced_precision(me: Rank) -> None:
    # float16 / bfloat16 input with float32 parameters and running statistics, against float64.
    counts = [6, 2, 4][: me.world]
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        sync = SyncBatchNorm(3, device=me.device)
        init_affine(sync, seed=1)
        ref = nn.BatchNorm2d(3, dtype=torch.float64, device=me.device)
        init_affine(ref, seed=1)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(sum(counts), 3, 4, 4, generator=g).to(me.device, dtype)
        start, stop = sum(counts[: me.rank]), sum(counts[: me.rank + 1])
        y = sync(x[start:stop])
        y_ref = ref(x.double())[start:stop]
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * 4)
        torch.testing.assert_close(sync.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-6)


def check_precision_testplan_34(me: Rank) -> None:
    # TESTPLAN 34: x = 1e4 + N(0, 1e-2) in float32, chunks of 0 and 1 values among uneven ones:
    # the merged variance is the full-batch one within 2e-5 relative.
    counts = [1, 0, 300] if me.world == 3 else [1, 257]
    channels = 4
    g = torch.Generator().manual_seed(4)
    x64 = (1e4 + 1e-2 * torch.randn(sum(counts), channels, generator=g, dtype=torch.float64)).to(me.device)
    start, stop = sum(counts[: me.rank]), sum(counts[: me.rank + 1])
    outputs = {}
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype)
        sync = SyncBatchNorm(channels, momentum=1.0, affine=False, dtype=dtype, device=me.device)
        y = sync(x[start:stop])
        stats = all_gather(torch.cat([sync.running_mean, sync.running_var]))
        outputs[dtype] = (x, y, sync, stats)
    for dtype, (x, y, sync, stats) in outputs.items():
        # Against the values this dtype's ranks actually hold, in float64.
        var, mean = torch.var_mean(x.double(), 0)
        torch.testing.assert_close(
            sync.running_mean.double(), mean, rtol=2e-7 if dtype == torch.float32 else 1e-12, atol=0
        )
        rel = ((sync.running_var.double() - var) / var).abs().max().item()
        assert rel <= 2e-5, f"{dtype}: running_var relative error {rel:.3g}"
        # Outputs: a float32 mean near 1e4 is itself rounded by up to 5% of a standard deviation,
        # so float32 outputs are compared with single-process bn_cuda in float32.
        y_ref = bn_cuda.BatchNorm1d(channels, affine=False, dtype=dtype, device=me.device)(x)[start:stop]
        # float64: |mean| / std = 1e6 magnifies the last-bit differences of the two means to ~1e-10.
        torch.testing.assert_close(y, y_ref, **({"rtol": 0, "atol": 1e-8} if dtype == torch.float64 else {}))
        assert all(torch.equal(s, stats[0]) for s in stats), f"{dtype}: running stats differ across ranks"


def check_eval_needs_no_peer(me: Rank) -> None:
    # Eval mode uses the running statistics and no collective: rank 0 runs it alone, and would
    # wait forever (here: until the collective timeout) if it needed a peer.
    sync = SyncBatchNorm(3)
    ref = bn_cuda.BatchNorm2d(3)
    for m in (sync, ref):
        init_affine(m, seed=5)
        with torch.no_grad():
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    sync.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 4)
    if me.rank == 0:
        torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    dist.barrier()


def check_no_running_stats(me: Rank) -> None:
    # track_running_stats=False: training synchronizes, eval normalizes with the local batch.
    counts = [2, 4, 3][: me.world]
    sync = SyncBatchNorm(3, track_running_stats=False, dtype=torch.float64).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()
    x = torch.randn(counts[me.rank], 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x), **TIGHT64)
    sync.train()
    ref.train()
    full = torch.randn(sum(counts), 3, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    start, stop = sum(counts[: me.rank]), sum(counts[: me.rank + 1])
    torch.testing.assert_close(sync(full[start:stop]), ref(full)[start:stop], **TIGHT64)
    assert sync.running_mean is None and sync.num_batches_tracked is None


def check_all_ranks_empty(me: Rank) -> None:
    sync = SyncBatchNorm(3)
    init_affine(sync, seed=7)
    sync.to(me.device)
    before = {k: v.clone() for k, v in sync.state_dict().items()}
    x = torch.randn(0, 3, 4, 4, device=me.device, requires_grad=True)
    y = sync(x)
    y.sum().backward()
    assert y.shape == x.shape
    assert x.grad is not None and x.grad.shape == x.shape
    assert not sync.weight.grad.any() and not sync.bias.grad.any()
    assert torch.equal(sync.running_mean, before["running_mean"])
    assert torch.equal(sync.running_var, before["running_var"])
    assert sync.num_batches_tracked.item() == 1  # as bn_cuda.BatchNorm2d on an empty batch


def check_group_of_one_value_raises(me: Rank) -> None:
    # One value per channel over the whole group: every rank raises (after the exchange, so
    # all of them do), and nothing changes.
    sync = SyncBatchNorm(3)
    x = torch.randn(1 if me.rank == 0 else 0, 3)
    try:
        sync(x)
    except ValueError as e:
        assert "Expected more than 1 value per channel when training" in str(e)
    else:
        raise AssertionError("no ValueError")
    assert sync.num_batches_tracked.item() == 0
    assert torch.equal(sync.running_var, torch.ones(3))


def check_subgroups(me: Rank) -> None:
    # Groups {0, 2} and {1}: the pair synchronizes, the single rank is plain batch norm.
    pair = dist.new_group([0, 2], timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    single = dist.new_group([1], timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    if me.rank in (0, 2):
        compare_with_single_process(me, [3, 4], torch.float64, tol=TIGHT64, group=pair, group_ranks=[0, 2])
    else:
        compare_with_single_process(me, [5], torch.float64, tol=TIGHT64, group=single, group_ranks=[1])
    dist.barrier()


def check_double_backward_refused(me: Rank) -> None:
    # Refused whatever follows the layer: after a linear head too, whose grad_output does not
    # require grad (@once_differentiable let that through, dropping the second-order term).
    sync = SyncBatchNorm(3, dtype=torch.float64)
    head = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    for loss in (lambda y: y.square().sum(), lambda y: (y * head).sum()):
        x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        (dx,) = torch.autograd.grad(loss(sync(x)), x, create_graph=True)
        try:
            dx.square().sum().backward()
        except RuntimeError as e:
            assert "not differentiable" in str(e)
        else:
            raise AssertionError("double backward did not raise")


def check_bad_arguments_as_plain_batch_norm(me: Rank) -> None:
    # In training over the group, every argument check of nn.BatchNorm holds on every rank (an
    # empty one too), with its error, before anything changes; no collective runs.
    def requiring_grad(m):
        m.running_mean.requires_grad_()
        return m

    def without_running_var(m):
        m.running_var = None
        return m

    def weight_of_5(m):
        m.weight = nn.Parameter(torch.ones(5))
        return m

    cases = [
        ("float64 input", lambda cls: cls(3), torch.randn(4, 3, 2, dtype=torch.float64)),
        ("running_mean requiring grad", lambda cls: requiring_grad(cls(3)), torch.randn(4, 3, 2)),
        ("no running_var", lambda cls: without_running_var(cls(3)), torch.randn(4, 3, 2)),
        ("wrong channel count", lambda cls: cls(3), torch.randn(4, 4, 2)),
        ("wrong channel count, no stats", lambda cls: cls(3, track_running_stats=False), torch.randn(4, 4, 2)),
        ("weight of 5", lambda cls: weight_of_5(cls(3)), torch.randn(4, 3, 2)),
    ]
    for name, make, x in cases:
        try:
            make(nn.BatchNorm1d)(x.clone())
        except Exception as error:  # nn's outcome is the expected one
            expected = error
        else:
            raise AssertionError(f"{name}: nn.BatchNorm1d accepted the call")
        sync = make(SyncBatchNorm)
        before = {k: v.clone() for k, v in sync.state_dict().items()}
        try:
            sync(x if me.rank == 0 else x[:0])
        except Exception as error:
            assert type(error) is type(expected) and str(error) == str(expected), (name, error, expected)
        else:
            raise AssertionError(f"{name}: no error on rank {me.rank}")
        for key, value in sync.state_dict().items():
            assert torch.equal(value, before[key]), (name, key)


def check_empty_rank_keeps_channels_last(me: Rank) -> None:
    sync = SyncBatchNorm(3).to(me.device)
    x = torch.randn(4 if me.rank == 0 else 0, 3, 4, 4, device=me.device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = sync(x)
    y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def check_ddp_training(me: Rank) -> None:
    # DDP with the converted model trains exactly like one process on the whole batch: DDP
    # averages the ranks' gradients, so each rank's loss is scaled by world / global batch.
    def make() -> nn.Module:
        torch.manual_seed(8)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)
        ).double()

    counts = [4] * me.world
    ref = bn_cuda.convert_model(make())
    model = nn.parallel.DistributedDataParallel(SyncBatchNorm.convert_sync_batchnorm(make()))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(9)
    start, stop = sum(counts[: me.rank]), sum(counts[: me.rank + 1])
    for _ in range(3):
        x = torch.randn(sum(counts), 3, 5, 5, generator=g, dtype=torch.float64)
        for net, optimizer, batch, scale in ((ref, opt_ref, x, 1.0), (model, opt, x[start:stop], me.world)):
            optimizer.zero_grad()
            loss = net(batch).square().sum() * scale / len(x)
            loss.backward()
            optimizer.step()
    mine = model.module.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mine[key], value, rtol=1e-9, atol=1e-12, msg=key)


# name: (ranks, device, checks). The cuda group runs NCCL with one GPU per rank, so it needs as
# many GPUs as ranks; it also exercises the path that never reads the group's count on the host.
GROUPS: dict[str, tuple[int, str, list[Callable[[Rank], None]]]] = {
    "cpu-2": (
        2,
        "cpu",
        [
            check_float64_uneven,
            check_float32_uneven,
            check_channels_last,
            check_momentum_none,
            check_empty_rank,
            check_single_value_rank,
            check_reduced_precision,
            check_precision_testplan_34,
            check_eval_needs_no_peer,
            check_no_running_stats,
            check_all_ranks_empty,
            check_double_backward_refused,
            check_bad_arguments_as_plain_batch_norm,
            check_empty_rank_keeps_channels_last,
            check_ddp_training,
        ],
    ),
    "cpu-3": (
        3,
        "cpu",
        [
            check_float64_uneven,
            check_float32_uneven,
            check_empty_rank,
            check_single_value_rank,
            check_precision_testplan_34,
            check_group_of_one_value_raises,
            check_subgroups,
        ],
    ),
    "cuda-2": (
        2,
        "cuda",
        [
            check_float64_uneven,
            check_float32_uneven,
            check_channels_last,
            check_momentum_none,
            check_empty_rank,
            check_single_value_rank,
            check_reduced_precision,
            check_precision_testplan_34,
            check_all_ranks_empty,
        ],
    ),
}


def worker(group_name: str, rank: int, port: int, out_dir: str) -> int:
    """One rank of a group: run every check of the group, recording each result as it comes."""
    world, device, checks = GROUPS[group_name]
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    me = Rank(rank, world, device)
    results: dict[str, str] = {}
    path = Path(out_dir) / f"rank{rank}.json"
    for check in checks:
        torch.manual_seed(100 + rank)
        try:
            check(me)
            results[check.__name__] = "ok"
        except AssertionError:
            results[check.__name__] = traceback.format_exc()
        except Exception:
            # Not a comparison: the group may be out of step (a collective missed), so stop here.
            results[check.__name__] = traceback.format_exc()
            path.write_text(json.dumps(results))
            return 1
        path.write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


# ---- the pytest side ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(name: str) -> tuple[dict[str, list[str | None]], str]:
    """Start the ranks of group ``name``, wait for them (killing them all past GROUP_TIMEOUT_S). Returns the
    per-check results (one entry per rank, None where a rank never reported) and the output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    world, _, checks = GROUPS[name]
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, name, str(rank), str(port), out_dir],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(world)
        ]
        outputs = []
        timed_out = False
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=GROUP_TIMEOUT_S if not timed_out else 1)
            except subprocess.TimeoutExpired:
                timed_out = True
                for p in procs:
                    p.kill()
                out, _ = proc.communicate()
            outputs.append(out)
        reports = []
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.json"
            reports.append(json.loads(path.read_text()) if path.exists() else {})
    log = "\n".join(
        f"--- rank {r} (exit {p.returncode}{', killed after timeout' if timed_out else ''}) ---\n{out[-4000:]}"
        for r, (p, out) in enumerate(zip(procs, outputs, strict=True))
    )
    return {c.__name__: [report.get(c.__name__) for report in reports] for c in checks}, log


_GROUP_RESULTS: dict[str, tuple[dict[str, list[str | None]], str]] = {}


@pytest.fixture(scope="module")
def group_results() -> Callable[[str], tuple[dict[str, list[str | None]], str]]:
    def get(name: str) -> tuple[dict[str, list[str | None]], str]:
        if name not in _GROUP_RESULTS:
            _GROUP_RESULTS[name] = run_group(name)
        return _GROUP_RESULTS[name]

    return get


def _group_marks(name: str) -> list[pytest.MarkDecorator]:
    world, device, _ = GROUPS[name]
    if device != "cuda":
        return []
    enough = HAS_CUDA and torch.cuda.device_count() >= world and dist.is_nccl_available()
    return [pytest.mark.cuda, pytest.mark.skipif(not enough, reason=f"needs {world} CUDA GPUs and NCCL")]


@pytest.mark.parametrize(
    ("group", "check"),
    [
        pytest.param(name, check.__name__, marks=_group_marks(name))
        for name, (_, _, checks) in GROUPS.items()
        for check in checks
    ],
)
def test_group(group_results, group: str, check: str) -> None:
    results, log = group_results(group)
    failures = [f"rank {r}: {res or 'did not run this check'}" for r, res in enumerate(results[check]) if res != "ok"]
    if failures:
        pytest.fail(f"{check} in group {group}:\n" + "\n".join(failures) + f"\n\nGroup output:\n{log}")


# ---- in this process ------------------------------------------------------------------------------


def chunks_of(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, counts))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [[0, 1, 63], [1, 0, 1, 62], [32, 32], [5, 0, 100, 27]])
def test_merge_is_full_batch_statistics(device, dtype, counts):
    # TESTPLAN 34 on the merge itself, including chunks of 0 and 1 values, at mean 1e4, std 1e-2.
    g = torch.Generator().manual_seed(sum(counts))
    x = (1e4 + 1e-2 * torch.randn(sum(counts), 5, 3, 3, generator=g, dtype=torch.float64)).to(device, dtype)
    gathered = torch.stack([local_stats(c) for c in chunks_of(x, counts)])
    count, mean, var = merge_stats(gathered)
    var_ref, mean_ref = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    assert count.dtype == torch.float64 and count.item() == x.numel() // 5
    assert ((var - var_ref) / var_ref).abs().max().item() <= 2e-5
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=0)


def test_merge_of_empty_chunks_is_neutral():
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    alone = merge_stats(local_stats(x)[None])
    padded = merge_stats(torch.stack([local_stats(x[:0]), local_stats(x), local_stats(x[:0])]))
    for a, b in zip(alone, padded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    count, mean, var = merge_stats(torch.stack([local_stats(x[:0])] * 2))
    assert count.item() == 0 and not mean.any() and not var.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", [0, 2, 7])
def test_running_stats_update_without_host_count(device, momentum, count):
    # The CUDA path (no host read of the group's count) matches the op given the count as an int.
    g = torch.Generator().manual_seed(count)
    mean = torch.randn(4, generator=g, dtype=torch.float64).to(device)
    var = torch.rand(4, generator=g, dtype=torch.float64).to(device)
    count_t = torch.tensor([float(count)], dtype=torch.float64, device=device)
    states = []
    for host_count in (count, None):
        rm = torch.linspace(-1.0, 1.0, 4, device=device)
        rv = torch.linspace(0.5, 2.0, 4, device=device)
        tracked = torch.tensor(3, device=device)
        if host_count is None:  # the CUDA path: the group's count as a device tensor
            track_batch(rm, rv, mean, var, 0, momentum, tracked, count_tensor=count_t)
        else:
            track_batch(rm, rv, mean, var, host_count, momentum, tracked)
        states.append((rm, rv))
    (rm_int, rv_int), (rm_dev, rv_dev) = states
    torch.testing.assert_close(rm_dev, rm_int, rtol=0, atol=0)
    torch.testing.assert_close(rv_dev, rv_int, rtol=1e-7, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_statistics_need_no_host_synchronization():
    # Everything of the forward but the collective: local statistics, merge, running statistics
    # update and normalize, with torch's CUDA synchronization detector set to raise.
    x = torch.randn(6, 3, 4, 4, device="cuda")
    running_mean, running_var = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    tracked = torch.tensor(0, device="cuda")  # counts this batch: cumulative factor 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gathered = torch.stack([local_stats(x[:2]), local_stats(x[2:])])
        count, mean, var = merge_stats(gathered)
        track_batch(running_mean, running_var, mean, var, 0, None, tracked, count_tensor=count)
        invstd = (var + 1e-5).rsqrt().float()
        y = torch.ops.bn_cuda.normalize(x, mean.float(), invstd, None, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    var_ref, mean_ref = torch.var_mean(x, (0, 2, 3))
    torch.testing.assert_close(running_var, var_ref)
    torch.testing.assert_close(running_mean, mean_ref)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_without_process_group_is_plain_batch_norm():
    assert not dist.is_initialized()
    ref, sync = bn_cuda.BatchNorm2d(3), SyncBatchNorm(3)
    for m in (ref, sync):
        init_affine(m, seed=10)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, ref.running_var, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sync(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        sync(torch.randn(3))
    with pytest.raises(ValueError, match="SyncBatchNorm number of input channels should be non-zero"):
        sync(torch.randn(2, 0, 3))


def test_constructor_and_state_dict_match_pytorch():
    for kwargs in ({}, {"momentum": None, "eps": 1e-3}, {"affine": False}, {"track_running_stats": False}):
        ours, theirs = SyncBatchNorm(5, **kwargs), nn.SyncBatchNorm(5, **kwargs)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
    if BATCHNORM_TAKES_BIAS:
        assert SyncBatchNorm(5, bias=False).bias is None
    else:
        with pytest.raises(TypeError, match="unexpected keyword argument 'bias'"):
            SyncBatchNorm(5, bias=False)
    m = SyncBatchNorm(5, process_group="pg", dtype=torch.float64)
    assert m.process_group == "pg" and m.weight.dtype == torch.float64
    # A checkpoint of nn.BatchNorm2d loads into it and back.
    trained = nn.BatchNorm2d(5)
    trained(torch.randn(4, 5, 2, 2))
    ours = SyncBatchNorm(5)
    ours.load_state_dict(trained.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_convert_sync_batchnorm_keeps_tensors():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=None),
        nn.Sequential(
            bn_cuda.BatchNorm1d(6, eps=1e-3, affine=False),
            nn.BatchNorm3d(2, **({"bias": False} if BATCHNORM_TAKES_BIAS else {})),
        ),
    )
    model[1].eval()
    originals = [(m, dict(m.named_parameters()), dict(m.named_buffers())) for m in model.modules()]
    originals = [o for o in originals if isinstance(o[0], nn.modules.batchnorm._BatchNorm)]
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert converted is model
    new = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(new) == 3 and all(type(m) is SyncBatchNorm for m in new)
    for m, (old, params, buffers) in zip(new, originals, strict=True):
        assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.training) == (
            old.num_features,
            old.eps,
            old.momentum,
            old.affine,
            old.track_running_stats,
            old.training,
        )
        assert m.process_group == "pg"
        for name, t in [*params.items(), *buffers.items()]:
            assert getattr(m, name) is t, name
        assert (m.bias is None) == (old.bias is None)
    single = SyncBatchNorm.convert_sync_batchnorm(bn_cuda.BatchNorm2d(4))
    assert type(single) is SyncBatchNorm


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
