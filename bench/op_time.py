"""Best time of one bn_cuda CPU op on one shape, for comparing two builds or two settings.

`python -m bench` compares bn_cuda with PyTorch inside one process; this compares bn_cuda with
itself across builds (scripts/compare_builds.sh runs it in two checkouts, alternating), where the
VM's noise would swamp a difference of a few percent between two separate bench runs. It prints
one number, microseconds: the best of `--reps` blocks of 8 calls over 8 rotated inputs (the best
block is the one least disturbed by the other tenants of the machine).

    python -m bench.op_time 32x2048x7x7 nchw bfloat16 eval --threads 1

`--ab-stream-mb MB` compares, in one process, the kernels' own bounds for writing outputs with
non-temporal stores (y from 32 MiB, dx from 8 MiB) with both at MB MiB, as BN_CUDA_CPU_STREAM_MB=MB
sets them: rounds of blocks under each setting, alternating (and which goes first), so that both
see the same machine; it prints the best of each and MB's time over the default's.

    python -m bench.op_time 32x512x14x14 nhwc float32 bwd --threads 2 --ab-stream-mb 32
"""

from __future__ import annotations

import argparse
import time

import torch

import bn_cuda  # its import registers torch.ops.bn_cuda

PASSES = ("eval", "train", "bwd", "module_train", "module_fwd_bwd")


def op_call(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype, pass_name: str):
    """A function of the rotation index that runs the pass once."""
    c, k = shape[1], 8
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(k)]
    ops = torch.ops.bn_cuda
    running_mean, running_var = torch.randn(c), torch.rand(c) + 0.5
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    if pass_name == "eval":
        return lambda i: ops.forward_eval(xs[i % k], running_mean, running_var, weight, bias, 1e-5)
    if pass_name == "train":
        return lambda i: ops.forward_train(xs[i % k], weight, bias, 1e-5)
    if pass_name == "bwd":
        dys = [torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(k)]
        _, mean, invstd, _ = ops.forward_train(xs[0], weight, bias, 1e-5)
        return lambda i: ops.backward(dys[i % k], xs[i % k], mean, invstd, weight, True, [True, True, True])
    # The whole module call in training (argument checks, autograd node, running statistics);
    # module_fwd_bwd: and its backward right after, as the bench's fwd+bwd pass.
    module = bn_cuda.BatchNorm2d(c) if len(shape) == 4 else bn_cuda.BatchNorm1d(c)
    for x in xs:
        x.requires_grad_()
    if pass_name == "module_train":
        return lambda i: module(xs[i % k])
    dys = [torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(k)]
    params = (module.weight, module.bias)
    return lambda i: torch.autograd.grad(module(xs[i % k]), (xs[i % k], *params), dys[i % k])


def best_us(call, reps: int) -> float:
    best = float("inf")
    for r in range(reps):
        start = time.perf_counter()
        for j in range(8):
            call(r * 8 + j)
        best = min(best, (time.perf_counter() - start) / 8)
    return best * 1e6


def best_us_ab(call, reps: int, stream_mb: int, rounds: int = 8) -> tuple[float, float]:
    """Best times with the kernels' own streaming bounds and with both at `stream_mb` MiB, over
    `rounds` rounds of `reps` // `rounds` blocks each, the first setting alternating between
    rounds; the setting in force before is restored."""
    from bn_cuda import _C

    previous = _C.set_cpu_stream_mb(-1)
    best = {-1: float("inf"), stream_mb: float("inf")}
    try:
        for r in range(rounds):
            for setting in (-1, stream_mb) if r % 2 == 0 else (stream_mb, -1):
                _C.set_cpu_stream_mb(setting)
                best[setting] = min(best[setting], best_us(call, max(1, reps // rounds)))
    finally:
        _C.set_cpu_stream_mb(previous)
    return best[-1], best[stream_mb]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="NxCxHxW (or NxC)")
    parser.add_argument("format", choices=("nchw", "nhwc"))
    parser.add_argument("dtype", choices=("float32", "float64", "float16", "bfloat16"))
    parser.add_argument("pass_name", metavar="pass", choices=PASSES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--ab-stream-mb", type=int, metavar="MB", help="compare streaming bounds (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    call = op_call(shape, args.format == "nhwc", getattr(torch, args.dtype), args.pass_name)
    if args.ab_stream_mb is None:
        print(f"{best_us(call, args.reps):.0f}")
        return 0
    if args.ab_stream_mb < 0:
        parser.error(f"--ab-stream-mb wants MiB >= 0, got {args.ab_stream_mb}")
    default, other = best_us_ab(call, args.reps, args.ab_stream_mb)
    print(f"{default:.0f} {other:.0f} {other / default:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
