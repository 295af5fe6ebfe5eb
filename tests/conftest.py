"""Shared fixtures: the devices to run on and a float64 reference batch norm."""

import inspect

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

HAS_CUDA = torch.cuda.is_available()

# Every device-parametrized test runs on the CPU, and on CUDA when a GPU is present; the CUDA
# cases are reported as skipped otherwise.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]

# `bias=False` on batch-norm modules exists from PyTorch 2.13 on; with an older torch the cases
# that use it are skipped (bn_cuda's modules take their constructor from torch's).
BATCHNORM_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters
needs_bias_argument = pytest.mark.skipif(
    not BATCHNORM_TAKES_BIAS, reason="this torch's batch-norm modules have no bias argument"
)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a run is reproducible and a tolerance
    that holds once holds every time."""
    torch.manual_seed(0)


def reference_batch_norm(x, weight=None, bias=None, eps=1e-5, training=True, running_mean=None, running_var=None):
    """Batch norm in float64 from its definition. Returns (y, batch_mean, batch_var_biased) in
    float64 on x's device; in eval mode the running statistics are used instead."""
    x64 = x.double()
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean = x64.mean(dims)
        var = x64.var(dims, correction=0)
    else:
        mean = running_mean.double()
        var = running_var.double()
    y = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y, mean, var


def assert_no_worse_than_torch(actual, expected, ref64, dtype, what="result"):
    """bn_cuda's ``actual`` is at most twice as far from the float64 reference ``ref64`` as
    PyTorch's ``expected``, plus a slack at the result's magnitude: four units in the last place
    of ``dtype``, and for float32 another 1e-5, the drift of a float32 sum over ~1e4 values
    (sqrt(n) ulp). For results that two correct implementations round differently:
    float16/bfloat16 outputs, and float32 sums over thousands of values taken in another order,
    where either of the two may happen to be the closer to float64."""
    if actual.numel() == 0:
        return
    slack = 4 * torch.finfo(dtype).eps + (1e-5 if dtype == torch.float32 else 0.0)
    atol = slack * max(1.0, ref64.abs().max().item())
    err = (actual.double() - ref64).abs().max().item()
    torch_err = (expected.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + atol, f"{what}: bn_cuda error {err}, PyTorch error {torch_err}"
