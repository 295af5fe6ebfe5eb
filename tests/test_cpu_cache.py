"""The CPU kernels' large outputs (1 MiB and more) come from a cache of freed blocks
(csrc/cpu/output_alloc.h): reused memory must never leak old values, two live outputs never
share memory, the storage stays resizable, and BN_CUDA_CPU_CACHE_MB bounds what is kept."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import reference_batch_norm

import bn_cuda

ROOT = Path(__file__).parent.parent
LARGE = (4, 4, 512, 512)  # 16 MiB of float32: above the cache's 8 MiB threshold
MIB = 1 << 20


def run_python(code: str, **env: str) -> str:
    """Runs code in a fresh interpreter (the cache limit is read once per process)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_reused_output_holds_the_new_values():
    bn = bn_cuda.BatchNorm2d(LARGE[1])
    y = bn(torch.randn(LARGE))
    first_ptr = y.data_ptr()
    del y
    before = bn_cuda.cpu_cache_info()
    assert before["cached_bytes"] >= 16 * MIB
    x = torch.randn(LARGE) * 3 + 5
    with torch.no_grad():
        y = bn(x)
    after = bn_cuda.cpu_cache_info()
    assert after["hits"] == before["hits"] + 1
    assert y.data_ptr() == first_ptr
    expected, _, _ = reference_batch_norm(x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_live_outputs_do_not_share_memory():
    x1 = torch.randn(LARGE)
    x2 = torch.randn(LARGE) + 10
    w = torch.ones(LARGE[1])
    b = torch.zeros(LARGE[1])
    y1 = torch.ops.bn_cuda.forward_train(x1, w, b, 1e-5)[0]
    y2 = torch.ops.bn_cuda.forward_train(x2, w, b, 1e-5)[0]
    assert y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y1.double(), reference_batch_norm(x1)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2.double(), reference_batch_norm(x2)[0], rtol=1e-5, atol=1e-5)


def test_backward_output_from_the_cache_is_correct():
    x = torch.randn(LARGE, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(LARGE)
    bn = bn_cuda.BatchNorm2d(LARGE[1])
    ref = torch.nn.BatchNorm2d(LARGE[1])
    for _ in range(2):  # the second round's outputs come from blocks the first one freed
        x.grad = None
        bn(x).backward(dy)
        ours = x.grad.clone()
        x.grad = None
        ref(x).backward(dy)
        torch.testing.assert_close(ours, x.grad, rtol=1e-4, atol=1e-5)


def test_output_storage_stays_resizable():
    x = torch.randn(LARGE)
    c = LARGE[1]
    y = torch.ops.bn_cuda.normalize(x, torch.zeros(c), torch.ones(c), None, None)
    assert y.untyped_storage().resizable()
    n = y.numel()
    y.resize_(n + 3 * MIB)  # past the block: the storage is reallocated and its values copied
    torch.testing.assert_close(y[:n].view(LARGE), x)


def test_mid_sized_outputs_come_from_the_cache():
    """Outputs of 1-8 MiB (page-aligned blocks, no huge pages) are reused too, and a reused block
    holds the new values, in the forward and the backward."""
    shape = (2, 8, 128, 128)  # 1 MiB of float32
    bn = bn_cuda.BatchNorm2d(8)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    bn(x).backward(dy)  # leaves freed blocks of this size behind
    x.grad = None
    before = bn_cuda.cpu_cache_info()
    y = bn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    after = bn_cuda.cpu_cache_info()
    assert after["hits"] >= before["hits"] + 2
    y_ref, _, _ = reference_batch_norm(x.detach(), bn.weight.detach(), bn.bias.detach())
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=0)
    x_ref = x.detach().double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(
        x_ref, None, None, bn.weight.detach().double(), bn.bias.detach().double(), True
    )
    (dx_ref,) = torch.autograd.grad(y64, x_ref, dy.double())
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-4, rtol=0)


def test_small_outputs_bypass_the_cache():
    before = bn_cuda.cpu_cache_info()
    bn_cuda.BatchNorm2d(4)(torch.randn(2, 4, 8, 8))
    after = bn_cuda.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_empty_cpu_cache_releases_everything():
    bn_cuda.BatchNorm2d(LARGE[1])(torch.randn(LARGE))
    assert bn_cuda.cpu_cache_info()["cached_bytes"] > 0
    bn_cuda.empty_cpu_cache()
    assert bn_cuda.cpu_cache_info()["cached_bytes"] == 0


def test_outputs_from_many_threads():
    xs = [torch.randn(LARGE) + i for i in range(4)]
    results = [None] * len(xs)

    def work(i):
        for _ in range(3):
            with torch.no_grad():
                results[i] = bn_cuda.functional.batch_norm(xs[i], None, None, training=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in zip(xs, results, strict=True):
        torch.testing.assert_close(y.double(), reference_batch_norm(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_starts_with_an_empty_cache():
    """A forked child (a DataLoader worker) gets a fresh lock and an empty cache: a lock held by
    another thread of the parent at the fork would otherwise never be released there."""
    bn_cuda.BatchNorm2d(LARGE[1])(torch.randn(LARGE))
    assert bn_cuda.cpu_cache_info()["cached_bytes"] > 0
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork
            if bn_cuda.cpu_cache_info()["cached_bytes"] == 0:
                x = torch.randn(LARGE)
                y = bn_cuda.functional.batch_norm(x, None, None, training=True)
                ok = torch.allclose(y.double(), reference_batch_norm(x)[0], rtol=1e-5, atol=1e-5)
                del y
                status = 0 if ok and bn_cuda.cpu_cache_info()["cached_bytes"] >= 16 * MIB else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


LIMIT_CHECK = """
import torch, bn_cuda
bn = bn_cuda.BatchNorm2d(4)
with torch.no_grad():
    ys = [bn(torch.randn(4, 4, 512, 512)) for _ in range(3)]  # three 16 MiB outputs
    del ys
    info = bn_cuda.cpu_cache_info()
    x = torch.randn(4, 4, 512, 512)
    y = bn(x)
    m, v = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(y, (x - m) / (v + 1e-5).sqrt(), atol=1e-5)
print(info["cached_bytes"] // 2**20, info["limit_bytes"] // 2**20)
"""


@pytest.mark.parametrize(("limit_mib", "kept_mib"), [("0", 0), ("40", 32), ("", 48), ("junk", 48)])
def test_cache_limit_from_the_environment(limit_mib, kept_mib):
    cached, limit = map(int, run_python(LIMIT_CHECK, BN_CUDA_CPU_CACHE_MB=limit_mib).split())
    assert cached == kept_mib
    assert limit == (int(limit_mib) if limit_mib.isdigit() else 1024)
