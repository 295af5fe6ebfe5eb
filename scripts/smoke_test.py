"""Smoke test of an installed bn_cuda: a few training steps and an eval step against
torch.nn.BatchNorm2d, NCHW and channels_last, on the CPU (and CUDA when present).

usage: python scripts/smoke_test.py [--expect-cuda {yes,no,any}]
Run it from outside the repository so that the installed package is the one imported.
"""

import argparse
import sys

import torch
from torch import nn


def check_device(bn_cuda, device: str) -> None:
    torch.manual_seed(0)
    ours = bn_cuda.BatchNorm2d(8, device=device)
    theirs = nn.BatchNorm2d(8, device=device)
    for fmt in (torch.contiguous_format, torch.channels_last):
        for _ in range(3):
            x = torch.randn(4, 8, 6, 5, device=device).to(memory_format=fmt)
            x_ours = x.clone().requires_grad_()
            x_theirs = x.clone().requires_grad_()
            y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
            grad = torch.randn_like(y_ours)
            y_ours.backward(grad)
            y_theirs.backward(grad)
            torch.testing.assert_close(y_ours, y_theirs)
            torch.testing.assert_close(x_ours.grad, x_theirs.grad)
            assert y_ours.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 8, 6, 5, device=device)
    torch.testing.assert_close(ours(x), theirs(x))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-cuda", choices=("yes", "no", "any"), default="any")
    args = parser.parse_args()
    import bn_cuda

    info = bn_cuda.build_info()
    print(f"bn_cuda from {bn_cuda.__file__}: {info}")
    if args.expect_cuda != "any" and info["cuda"] != (args.expect_cuda == "yes"):
        print(f"expected CUDA kernels compiled: {args.expect_cuda}, got {info['cuda']}")
        return 1
    devices = ["cpu"] + (["cuda"] if info["cuda"] and torch.cuda.is_available() else [])
    for device in devices:
        check_device(bn_cuda, device)
        print(f"smoke test passed on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
