"""The per-channel arithmetic of batch norm, written once for both backends.

Between its passes over the data, batch norm turns a few per-channel sums into
the coefficients of the next pass. These functions are that arithmetic, one
channel at a time, in float64, as plain Python: the CPU backend compiles them
with ``numba.njit`` (inlined into its kernels), the CUDA backend with
``cuda.jit(device=True)``. So the CPU, the GPU, SyncBatchNorm and the Dask
path compute the same numbers the same way; no other copy exists.

Each function stands alone: a compiled function calls only compiled ones.
No float ``min``/``max``: on the GPU they drop NaN. Every clamp is a comparison
that NaN fails, so NaN and infinities propagate as in PyTorch.
"""

from __future__ import annotations

import math
from typing import Any


def channel_moments(total: float, total_squares: float, shift: float, count: int) -> tuple:
    """``(mean, M2)`` from ``sum(x - shift)`` and ``sum((x - shift)^2)`` over ``count`` values.

    Rounding can leave M2 a little below 0; the clamp keeps NaN.
    """
    mean = shift + total / count
    m2 = total_squares - total * total / count
    if m2 < 0.0:
        m2 = 0.0
    return mean, m2


def scale_channel(variance: float, weight: float, eps: float) -> tuple:
    """``(invstd, scale)`` of the normalisation ``(x - mean) * scale + bias``.

    ``variance`` is the batch's (``M2 / count``) in training, the running one
    in evaluation. A zero one with ``eps=0`` gives inf, a negative one (a bad
    running statistic) or NaN gives NaN.
    """
    shifted = variance + eps
    # IEEE's 1 / sqrt(0) and sqrt(-1), written out (the CUDA simulator would raise).
    invstd = math.inf if shifted == 0.0 else math.nan
    if shifted > 0.0:
        invstd = 1.0 / math.sqrt(shifted)
    return invstd, weight * invstd


def running_average(running: float, statistic: float, momentum: float) -> float:
    """PyTorch's update of a running statistic, as written there."""
    return (1.0 - momentum) * running + momentum * statistic


def unbiased_variance(m2: float, count: int) -> float:
    """Bessel-corrected variance, what the running variance averages (count > 1 in training)."""
    return m2 / (count - 1) if count > 1 else m2


def backward_channel(
    sum_dy: float, sum_dy_xmu: float, count: int, invstd: float, weight: float
) -> tuple:
    """``(alpha, beta, gamma)`` of ``dx = (dy + beta * (x - mean) + gamma) * alpha``.

    That is ``dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * weight * invstd``,
    factored as PyTorch does: ``alpha`` multiplies last.
    """
    alpha = weight * invstd
    beta = -invstd * invstd * sum_dy_xmu / count
    gamma = -sum_dy / count
    return alpha, beta, gamma


def parameter_gradients(sum_dy: Any, sum_dy_xmu: Any, invstd: Any) -> tuple:
    """``(dweight, dbias) = (sum(dy * xhat), sum(dy))`` from the backward's sums.

    Plain arithmetic, so it takes NumPy vectors as well as one channel's values.
    """
    return sum_dy_xmu * invstd, sum_dy


def merged_channel(
    count_a: int, mean_a: float, m2_a: float, count_b: int, mean_b: float, m2_b: float
) -> tuple:
    """One channel's ``(mean, M2)`` over two sets of values (Chan et al.).

    A non-finite mean on either side (data with NaN or infinities) gives
    PyTorch's statistics of the whole data: the count-weighted mean (+-inf, or
    NaN for NaN or infinities of both signs) and an M2 of NaN. Chan's update
    would subtract the infinite means.
    """
    if count_b == 0:
        return mean_a, m2_a
    if count_a == 0:
        return mean_b, m2_b if math.isfinite(mean_b) else math.nan
    total = count_a + count_b
    if math.isfinite(mean_a) and math.isfinite(mean_b):
        delta = mean_b - mean_a
        mean = mean_a + delta * (count_b / total)
        return mean, m2_a + m2_b + delta * delta * (float(count_a) * count_b / total)
    return (mean_a * count_a + mean_b * count_b) / total, math.nan
