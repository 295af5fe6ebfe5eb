"""Where a CUDA batch-norm call spends its time: host (issuing launches) against device (kernels).

For a few ResNet-50 shapes and both memory formats, prints per call of bn_cuda.BatchNorm2d and
nn.BatchNorm2d (cuDNN): the host time to issue a training forward, the time until its kernels have
run, the same for eval, and the kernels of one bn_cuda training forward with their device time
(torch.profiler). A call whose total time is close to its host time is bound by launches, not by
its kernels. Run by scripts/gpu_check.sh; `python scripts/profile_cuda.py` on a GPU box.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bn_cuda  # the checkout's package, importable from any working directory

SHAPES = [
    ((256, 512, 7, 7), False),
    ((256, 256, 14, 14), False),
    ((256, 128, 28, 28), True),
    ((256, 64, 56, 56), True),
]
CALLS = 50


def per_call_us(fn) -> tuple[float, float]:
    """(host time to issue one call, time per call until its kernels finished), in microseconds."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) / CALLS * 1e6, (done - start) / CALLS * 1e6


def profiled(fn, calls: int):
    """torch.profiler's averages over `calls` calls of fn, CPU and CUDA activity."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernels_of(fn, calls: int = 10) -> list[tuple[str, float]]:
    """(kernel name, device microseconds per call) of fn, largest first."""
    rows = [(e.key, e.device_time_total / calls) for e in profiled(fn, calls) if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def host_ops_of(fn, calls: int = 20, top: int = 10) -> list[tuple[str, float, float]]:
    """(op name, host microseconds per call spent in the op itself, device microseconds per call)
    of fn, by host time, largest first: where the issuing time of a launch-bound call goes."""
    fn()
    torch.cuda.synchronize()
    rows = [(e.key, e.self_cpu_time_total / calls, e.self_device_time_total / calls) for e in profiled(fn, calls)]
    return sorted(rows, key=lambda r: -r[1])[:top]


def training_step(module, x, grad):
    """One forward and backward of module on x (the fwd+bwd pass of the bench)."""
    x.grad = None
    module(x).backward(grad)


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_cuda: no CUDA GPU visible", file=sys.stderr)
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, float32; microseconds per call")
    for shape, channels_last in SHAPES:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(shape, device="cuda").contiguous(memory_format=fmt).requires_grad_()
        label = f"{'x'.join(map(str, shape))} {'nhwc' if channels_last else 'nchw'}"
        for name, cls in (("bn_cuda", bn_cuda.BatchNorm2d), ("cudnn", nn.BatchNorm2d)):
            module = cls(shape[1], device="cuda")
            call = functools.partial(module, x)
            host, total = per_call_us(call)
            module.eval()
            with torch.no_grad():
                eval_host, eval_total = per_call_us(call)
            module.train()
            print(
                f"{label:20s} {name:8s} fwd-train host {host:7.1f} total {total:7.1f}"
                f" | fwd-eval host {eval_host:6.1f} total {eval_total:6.1f}"
            )
            grad = torch.randn_like(x)
            step_host, step_total = per_call_us(functools.partial(training_step, module, x, grad))
            print(f"{label:20s} {name:8s} fwd+bwd   host {step_host:7.1f} total {step_total:7.1f}")
            if name == "bn_cuda":
                for kernel, device_us in kernels_of(call)[:5]:
                    print(f"    {device_us:7.1f}  {kernel[:100]}")
                if shape == SHAPES[0][0]:
                    # The op alone (no module, no running statistics): the Python layer's share.
                    op = functools.partial(torch.ops.bn_cuda.forward_train, x, module.weight, module.bias, 1e-5)
                    op_host, op_total = per_call_us(op)
                    print(f"    op forward_train alone: host {op_host:7.1f} total {op_total:7.1f}")
                    print("    host us/call (self), device us/call, op -- training forward:")
                    for key, host_us, device_us in host_ops_of(call):
                        print(f"    {host_us:7.1f} {device_us:7.1f}  {key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
