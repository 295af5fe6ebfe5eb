"""The timed passes: what one call of each pass does, bound to a module and its rotated inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

PASSES = ("fwd-train", "bwd", "fwd+bwd", "fwd-eval")

# One call of a pass on the rotated input with the given index; returns what the pass produces
# (y, or the gradients), which the runner compares across implementations.
Step = Callable[[int], Any]


def bind(pass_name: str, module: nn.Module, xs: Sequence[torch.Tensor], dys: Sequence[torch.Tensor]) -> Step:
    """Put `module` in the pass's mode and return its step.

    xs require grad (as the output of a previous layer does), so a training forward saves what the
    backward needs, exactly as inside a network. For "bwd" the forward graphs, one per rotated
    input, are built here, outside the timed region, and kept (retain_graph) so that each timed
    call is a backward alone. "fwd-eval" runs under no_grad, as inference does.
    """
    params = tuple(p for p in module.parameters() if p.requires_grad)
    if pass_name == "fwd-train":
        module.train()
        return lambda i: module(xs[i])
    if pass_name == "bwd":
        module.train()
        ys = [module(x) for x in xs]
        return lambda i: torch.autograd.grad(ys[i], (xs[i], *params), dys[i], retain_graph=True)
    if pass_name == "fwd+bwd":
        module.train()
        return lambda i: torch.autograd.grad(module(xs[i]), (xs[i], *params), dys[i])
    if pass_name == "fwd-eval":
        module.eval()

        def eval_step(i: int) -> torch.Tensor:
            with torch.no_grad():
                return module(xs[i])

        return eval_step
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {', '.join(PASSES)}")
