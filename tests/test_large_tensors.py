"""More than 2^31 elements on the CPU (TESTPLAN 31; the CUDA case is in test_cuda.py): 64-bit
offsets in every loop, and a channel with more than 2^31 values (its count).

The tensors are float16 patterns whose statistics and results are known exactly, so the check is
over every element (per-position max and min) without a float64 copy of 4 GiB of input:
x alternates a_c + s_c and a_c - s_c from one row (spatial position) to the next, so its batch
mean is a_c and its biased variance s_c^2; dy runs +1, +1, -1, -1, so it is uncorrelated with x
and sums to zero, and dx is dy * weight * invstd with zero weight and bias gradients.
"""

import pytest
import torch

import bn_cuda  # noqa: F401  (registers torch.ops.bn_cuda)

ops = torch.ops.bn_cuda
EPS = 1e-5


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rows_view(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The storage of a dense 4-D tensor as (rows, C): one row per (n, h, w), in memory order."""
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    assert t.shape[1] == 1  # NCHW with one channel: the storage is that channel's values
    return t.view(-1, 1)


def words(t: torch.Tensor, channels_last: bool, period: int) -> torch.Tensor:
    """The storage of float16 ``t`` as int64 words, one row of the view per 4 periods of rows
    (4 periods of C float16 values are a whole number of 8-byte words)."""
    return rows_view(t, channels_last).reshape(-1, 4 * period * t.shape[1]).view(torch.int64)


def fill_periodic(t: torch.Tensor, channels_last: bool, pattern: torch.Tensor) -> None:
    """Row r of t (see rows_view) becomes pattern[r % period] (pattern: period x C float16)."""
    tile = pattern.repeat(4, 1).reshape(1, -1).view(torch.int64)
    words(t, channels_last, pattern.shape[0]).copy_(tile.expand_as(words(t, channels_last, pattern.shape[0])))


def assert_rows_periodic(t: torch.Tensor, channels_last: bool, expected: torch.Tensor, what: str) -> None:
    """Row r of t equals expected[r % period] (expected: period x C float64) within one float16
    rounding. Compared bit for bit with the first rows where the kernel wrote the same bits
    everywhere (fast), else by the largest and smallest value at each position of the period."""
    period = expected.shape[0]
    tol = 1e-3 * (1 + expected.abs())
    first = rows_view(t, channels_last)[:period].double()
    assert ((first - expected).abs() <= tol).all(), f"{what}: first rows {first}, expected {expected}"
    w = words(t, channels_last, period)
    if bool((w == w[:1]).all()):
        return
    rows = rows_view(t, channels_last).reshape(-1, period * t.shape[1])
    low, high = torch.aminmax(rows, dim=0)
    for got in (low, high):
        got = got.double().view(period, -1)
        assert ((got - expected).abs() <= tol).all(), f"{what}: {got}, expected {expected}"


# NCHW with one channel: 2^31 + 2^16 values in that channel, in two planes (read a channel at a
# time), or 2^31 + 544 in 7x7 planes (read image by image, in memory order). channels_last with
# four channels: 2^31 + 2^17 elements, offsets row * 4 + c past 2^31.
SHAPES = {
    "nchw-one-channel": ((2, 1, 32768, 32769), False),
    "nchw-short-planes": ((43826208, 1, 7, 7), False),
    "nhwc": ((1, 4, 16385, 32768), True),
}


@pytest.mark.large
@pytest.mark.parametrize("case", list(SHAPES))
def test_more_than_2_31_elements_cpu(case):
    shape, channels_last = SHAPES[case]
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    assert numel > 2**31
    # x, dy and one result alive at a time (float16), plus slack for the reductions' temporaries.
    needed = 3 * 2 * numel + 2 * 2**30
    if available_bytes() < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free memory")
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a = torch.tensor([0.5, -1.0, 2.0, 0.25][:c], dtype=torch.float64)
    s = torch.tensor([1.5, 0.5, 3.0, 1.0][:c], dtype=torch.float64)
    weight = torch.tensor([1.25, 0.75, -0.5, 2.0][:c])
    bias = torch.tensor([0.5, -0.25, 1.0, 0.0][:c])

    x = torch.empty(shape, dtype=torch.float16, memory_format=fmt)
    fill_periodic(x, channels_last, torch.stack([a + s, a - s]).half())

    y, mean, invstd, var = ops.forward_train(x, weight, bias, EPS)
    torch.testing.assert_close(mean.double(), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(var.double(), s * s, rtol=1e-6, atol=0)
    istd = (s * s + EPS).rsqrt()
    torch.testing.assert_close(invstd.double(), istd, rtol=1e-6, atol=0)
    scaled = s * istd * weight.double()
    assert_rows_periodic(y, channels_last, torch.stack([scaled, -scaled]) + bias.double(), "output")
    del y

    dy = torch.empty_like(x)
    fill_periodic(dy, channels_last, torch.tensor([1.0, 1.0, -1.0, -1.0]).view(4, 1).expand(4, c).half())
    dx, dw, db = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    # Both sums are of exactly representable terms that cancel: zero up to rounding of the scale.
    assert dw.abs().max().item() <= 1e-3 and db.abs().max().item() <= 1e-3, (dw, db)
    k = weight.double() * istd
    assert_rows_periodic(dx, channels_last, torch.stack([k, k, -k, -k]), "grad_input")
