"""Numba CUDA kernels.

Every operand is a 4-D view ``(A, C, R, S)`` of the caller's array (see
:mod:`numbabn._views`; the channels-inner layout is ``(P, C, 1, 1)`` here).
The blocks are ``(chunk, channel group)`` pairs: block ``(i, j)`` covers chunk ``i`` of
the ``A * R * S`` values of its channel group ``j``, which is one channel for
planar data (threads walk along ``S``) or ``LANES`` adjacent channels for
channels-inner data (a warp reads ``LANES`` neighbouring channels at once).

Reductions are deterministic without floating-point atomics: each block sums
its values in a fixed order and writes one partial per channel; the last block
of a channel group to finish (an integer counter tells which) adds the
partials in block order and computes the per-channel coefficients, so a
training pass is two launches, statistics then the elementwise pass. The grid
depends only on the shape, never on the GPU, so results are reproducible.

Values are accumulated in float64 around a per-channel shift (the channel's
first value for the statistics, the mean for the gradient sums), which keeps
data far from zero precise; the elementwise pass also works in float64 and
rounds once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from numba import cuda, float64, int32

from numbabn import _coefficients, _source_stamp, _tunables

# Threads per block, channels per block in the channels-inner layout (the tests
# patch them small under the simulator, so that ragged edges run).
THREADS = _tunables.THREADS
LANES = _tunables.LANES

# Kernels are cached on disk like the CPU ones, so a warm start compiles nothing;
# the cache is keyed by every source their code comes from (see numbabn._source_stamp).
SOURCES = (Path(__file__), Path(_coefficients.__file__), Path(_tunables.__file__))
_DIGEST = _source_stamp.digest(SOURCES)


def _kernel(function: Any) -> Any:
    return _source_stamp.stamp(cuda.jit(cache=True)(function), "numbabn._cuda", _DIGEST)


# The rows of the per-channel coefficients (a float64 array of shape (6, C)).
# Normalisation: y = relu((x - MEAN) * SCALE + SHIFT (+ z)), with INVSTD kept for
# backward and M2 (the batch's sum of squared deviations) for the moments alone.
MEAN, INVSTD, SCALE, SHIFT, M2 = 0, 1, 2, 3, 4
# Gradient: dx = (g + BETA * (x - MEAN) + GAMMA) * ALPHA, where g is dy masked by
# the forward's ReLU, rebuilt as (x - MEAN) * MASK_SCALE + MASK_SHIFT (+ z) > 0.
ALPHA, BETA, GAMMA, MASK_SCALE, MASK_SHIFT = 1, 2, 3, 4, 5
N_COEFFICIENTS = 6

# What the elementwise kernel computes.
AFFINE = 0  # out = relu((x - MEAN) * SCALE + SHIFT + z)
GRADIENT = 1  # out = (dy + BETA * (x - MEAN) + GAMMA) * ALPHA
MASKED_GRADIENT = 2  # the same through the forward's ReLU
MASKED_SCALE = 3  # out = g * ALPHA, g = dy through the forward's ReLU (fixed statistics)

# NaN must propagate as in PyTorch: no float max()/min() anywhere (on the GPU
# they lower to PTX max/min, which return the operand that is not NaN); clamps
# and the ReLU are written as comparisons that NaN fails.


# The per-channel arithmetic, shared with the CPU kernels (see numbabn._coefficients).
_device = cuda.jit(device=True)
_channel_moments = _device(_coefficients.channel_moments)
_scale_channel = _device(_coefficients.scale_channel)
_running_average = _device(_coefficients.running_average)
_unbiased_variance = _device(_coefficients.unbiased_variance)
_backward_channel = _device(_coefficients.backward_channel)


@cuda.jit(device=True)
def _finite_or_zero(value):
    """``value``, or 0 when it is infinite or NaN (a shift must not make ``inf - inf``)."""
    return value if math.isfinite(value) else 0.0


@cuda.jit(device=True)
def _relu(value):
    """``value`` clamped below at 0; NaN stays NaN."""
    return 0.0 if value < 0.0 else value


@cuda.jit(device=True)
def _block_position(n_chunks):
    """This block's ``(chunk, channel group)``: the grid is one-dimensional, chunks fastest.

    (A second grid axis would cap the channel groups at 65535.)
    """
    block = cuda.blockIdx.x
    return block % n_chunks, block // n_chunks


@cuda.jit(device=True)
def _n_chunks(x, per_block):
    n_values = x.shape[0] * x.shape[2] * x.shape[3]
    return (n_values + per_block - 1) // per_block


@cuda.jit(device=True)
def _thread_range(x, channel_lanes, per_block):
    """This thread's channel, first value index, stop and step within the block's chunk."""
    chunk, group = _block_position(_n_chunks(x, per_block))
    t = cuda.threadIdx.x
    if channel_lanes:
        channel = group * LANES + t % LANES
        first = t // LANES
        step = THREADS // LANES
    else:
        channel = group
        first = t
        step = THREADS
    start = chunk * per_block
    return channel, start + first, start + per_block, step, channel < x.shape[1]


@cuda.jit(device=True)
def _thread_sums(v, u, kv, ku, squares, channel, k, stop, step):
    """``sum(v - kv)`` and ``sum((v - kv) * (u - ku))`` over this thread's values."""
    stop, n_r, n_s, a, r, s, da, dr, ds = _walk(v, k, stop, step)
    sum_v = 0.0
    sum_vu = 0.0
    while k < stop:
        dv = float64(v[a, channel, r, s]) - kv
        sum_v += dv
        if squares:
            sum_vu += dv * dv
        else:
            sum_vu += dv * (float64(u[a, channel, r, s]) - ku)
        k += step
        a, r, s = _advance(a, r, s, da, dr, ds, n_r, n_s)
    return sum_v, sum_vu


@cuda.jit(device=True)
def _walk(x, k, stop, step):
    """Where a thread's walk over a channel's values starts, ends, and how it steps.

    Returns the clipped stop, ``R`` and ``S``, value ``k`` as ``(a, r, s)`` and
    ``step`` in the same form, for :func:`_advance`.
    """
    n_r = x.shape[2]
    n_s = x.shape[3]
    stop = min(stop, x.shape[0] * n_r * n_s)
    a, r, s = _unravel(k, n_r, n_s)
    da, dr, ds = _unravel(step, n_r, n_s)
    return stop, n_r, n_s, a, r, s, da, dr, ds


@cuda.jit(device=True)
def _unravel(k, n_r, n_s):
    """Value ``k`` of a channel as ``(a, r, s)``."""
    q = k // n_s
    return q // n_r, q % n_r, k % n_s


@cuda.jit(device=True)
def _advance(a, r, s, da, dr, ds, n_r, n_s):
    """``(a, r, s)`` moved on by ``(da, dr, ds)``, with carries (no division)."""
    s += ds
    r += dr
    if s >= n_s:
        s -= n_s
        r += 1
    a += da
    if r >= n_r:
        r -= n_r
        a += 1
    return a, r, s


@cuda.jit(device=True)
def _block_sums(sum_v, sum_vu, channel_lanes, partials, counters):
    """Reduce the block's per-thread sums in a fixed order into ``partials[c, chunk]``.

    Returns True in the last block of the channel group to finish; that block
    then sees every other block's partials.
    """
    t = cuda.threadIdx.x
    shared_v = cuda.shared.array(THREADS, float64)
    shared_vu = cuda.shared.array(THREADS, float64)
    shared_v[t] = sum_v
    shared_vu[t] = sum_vu
    cuda.syncthreads()
    # Channels-inner blocks keep one sum per lane: pairs stay LANES apart.
    keep = LANES if channel_lanes else 1
    width = THREADS // 2
    while width >= keep:
        if t < width:
            shared_v[t] += shared_v[t + width]
            shared_vu[t] += shared_vu[t + width]
        cuda.syncthreads()
        width //= 2
    n_chunks = partials.shape[1]
    chunk, group = _block_position(n_chunks)
    channel = group * LANES + t if channel_lanes else group
    if t < keep and channel < partials.shape[0]:
        partials[channel, chunk, 0] = shared_v[t]
        partials[channel, chunk, 1] = shared_vu[t]
    return _last_block(counters, group, n_chunks)


@cuda.jit(device=True)
def _last_block(counters, group, n_chunks):
    """Whether this block is the last of its channel group to have written its partials."""
    is_last = cuda.shared.array(1, int32)
    cuda.threadfence()  # this block's partials are visible before the count says so
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        finished = cuda.atomic.add(counters, group, 1)
        cuda.threadfence()  # and the other blocks' partials are read after it
        is_last[0] = 1 if finished == n_chunks - 1 else 0
    cuda.syncthreads()
    return is_last[0] != 0


@cuda.jit(device=True)
def _totals(partials, channel):
    """A channel's partials summed in block order."""
    total_v = 0.0
    total_vu = 0.0
    for chunk in range(partials.shape[1]):
        total_v += partials[channel, chunk, 0]
        total_vu += partials[channel, chunk, 1]
    return total_v, total_vu


@cuda.jit(device=True)
def _finishing_channel(channel_lanes, n_channels, partials):
    """The channel this thread finishes in the last block, or -1."""
    t = cuda.threadIdx.x
    _, group = _block_position(partials.shape[1])
    if channel_lanes:
        channel = group * LANES + t
        return channel if t < LANES and channel < n_channels else -1
    return group if t == 0 else -1


@_kernel
def forward_statistics(
    x, channel_lanes, per_block, weight, bias, running_mean, running_var, momentum, eps,
    coeffs, partials, counters,
):  # fmt: skip
    """Batch statistics; writes ``coeffs = [mean, invstd, weight * invstd, bias]``.

    Updates the running statistics in place when ``momentum`` is not negative.
    """
    n_channels = x.shape[1]
    channel, k, stop, step, active = _thread_range(x, channel_lanes, per_block)
    sum_v = 0.0
    sum_vu = 0.0
    if active:
        shift = _finite_or_zero(float64(x[0, channel, 0, 0]))
        sum_v, sum_vu = _thread_sums(x, x, shift, shift, True, channel, k, stop, step)
    if not _block_sums(sum_v, sum_vu, channel_lanes, partials, counters):
        return
    c = _finishing_channel(channel_lanes, n_channels, partials)
    if c >= 0:
        total_v, total_vu = _totals(partials, c)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        shift = _finite_or_zero(float64(x[0, c, 0, 0]))
        mean, m2 = _channel_moments(total_v, total_vu, shift, count)
        invstd, scale = _scale_channel(m2 / count, float64(weight[c]), eps)
        coeffs[MEAN, c] = mean
        coeffs[INVSTD, c] = invstd
        coeffs[SCALE, c] = scale
        coeffs[SHIFT, c] = float64(bias[c])
        coeffs[M2, c] = m2
        if momentum >= 0.0:
            unbiased = _unbiased_variance(m2, count)
            running_mean[c] = _running_average(float64(running_mean[c]), mean, momentum)
            running_var[c] = _running_average(float64(running_var[c]), unbiased, momentum)
    _reset_counter(counters, partials)


@cuda.jit(device=True)
def _reset_counter(counters, partials):
    """Leave the group's counter at zero for the next launch (the scratch is reused)."""
    if cuda.threadIdx.x == 0:
        counters[_block_position(partials.shape[1])[1]] = 0


@cuda.jit(device=True)
def _pre_activation(x, z, m, scale, shift, residual):
    """The value before the ReLU, in float64, exactly as the forward computes it."""
    value = (float64(x) - m) * scale + shift
    if residual:
        value += float64(z)
    return value


@cuda.jit(device=True)
def _thread_masked_sums(dy, x, z, m, scale, shift, residual, channel, k, stop, step):
    """``sum(g)`` and ``sum(g * (x - m))`` with ``g = dy`` unless the pre-activation is 0 or below.

    A NaN pre-activation passes ``dy`` on, as PyTorch's ReLU backward does.
    """
    stop, n_r, n_s, a, r, s, da, dr, ds = _walk(x, k, stop, step)
    sum_g = 0.0
    sum_gx = 0.0
    while k < stop:
        value = _pre_activation(x[a, channel, r, s], z[a, channel, r, s], m, scale, shift, residual)
        g = 0.0 if value <= 0.0 else float64(dy[a, channel, r, s])
        # Masked values still add 0 * (x - m): NaN for infinite x, as in PyTorch.
        sum_g += g
        sum_gx += g * (float64(x[a, channel, r, s]) - m)
        k += step
        a, r, s = _advance(a, r, s, da, dr, ds, n_r, n_s)
    return sum_g, sum_gx


@_kernel
def gradient_sums(
    dy, x, z, channel_lanes, per_block, mean, invstd, weight, bias, masked, residual,
    batch_stats, coeffs, grads, partials, counters,
):  # fmt: skip
    """``sum(g)`` and ``sum(g * (x - mean))`` per channel, finished into gradients.

    ``g`` is ``dy``, or with ``masked`` ``dy`` unless the forward's ReLU input
    ``(x - mean) * weight * invstd + bias (+ z)`` was 0 or below. Writes
    ``grads = [sum(g * xhat), sum(g)]`` (the weight and bias gradients) and
    ``coeffs = [mean, alpha, beta, gamma, scale, shift]``: the input gradient is
    ``(g + beta * (x - mean) + gamma) * alpha`` (through the batch statistics
    with ``batch_stats``, else ``g * weight * invstd``), and the last two rows
    rebuild the mask. ``alpha`` multiplies last, as in PyTorch.
    """
    n_channels = x.shape[1]
    channel, k, stop, step, active = _thread_range(x, channel_lanes, per_block)
    sum_v = 0.0
    sum_vu = 0.0
    if active:
        m = mean[channel]
        if masked:
            scale = float64(weight[channel]) * invstd[channel]
            shift = float64(bias[channel])
            sum_v, sum_vu = _thread_masked_sums(
                dy, x, z, m, scale, shift, residual, channel, k, stop, step
            )
        else:
            sum_v, sum_vu = _thread_sums(dy, x, 0.0, m, False, channel, k, stop, step)
    if not _block_sums(sum_v, sum_vu, channel_lanes, partials, counters):
        return
    c = _finishing_channel(channel_lanes, n_channels, partials)
    if c >= 0:
        sum_g, sum_gx = _totals(partials, c)
        grads[0, c] = sum_gx * invstd[c]
        grads[1, c] = sum_g
        count = x.shape[0] * x.shape[2] * x.shape[3]
        alpha, beta, gamma = _backward_channel(sum_g, sum_gx, count, invstd[c], float64(weight[c]))
        if not batch_stats:  # dx = g * weight * invstd
            beta = 0.0
            gamma = 0.0
        coeffs[MEAN, c] = mean[c]
        coeffs[ALPHA, c] = alpha
        coeffs[BETA, c] = beta
        coeffs[GAMMA, c] = gamma
        coeffs[MASK_SCALE, c] = alpha
        coeffs[MASK_SHIFT, c] = float64(bias[c])
    _reset_counter(counters, partials)


@_kernel
def elementwise(x, dy, z, channel_lanes, per_block, mode, residual, relu, coeffs, out, dz):
    """``out`` from ``x`` (and ``dy``, ``z``) with per-channel ``coeffs``, in float64.

    ``AFFINE``: ``relu((x - c0) * c2 + c3 + z)`` (the add and ReLU as flagged);
    ``GRADIENT``: ``(dy + c2 * (x - c0) + c3) * c1``; ``MASKED_GRADIENT``: the
    same with ``g = dy`` unless ``(x - c0) * c4 + c5 (+ z)`` is 0 or below (NaN
    passes, as in PyTorch), and ``dz = g`` when ``residual``; ``MASKED_SCALE``:
    ``g * c1`` (``x`` only enters the mask).
    """
    channel, k, stop, step, active = _thread_range(x, channel_lanes, per_block)
    if not active:
        return
    stop, n_r, n_s, a, r, s, da, dr, ds = _walk(x, k, stop, step)
    c0 = coeffs[MEAN, channel]
    c1 = coeffs[ALPHA, channel]
    c2 = coeffs[SCALE, channel]  # BETA in the gradient modes
    c3 = coeffs[SHIFT, channel]  # GAMMA in the gradient modes
    while k < stop:
        centred = float64(x[a, channel, r, s]) - c0
        if mode == AFFINE:
            value = centred * c2 + c3
            if residual:
                value += float64(z[a, channel, r, s])
            out[a, channel, r, s] = _relu(value) if relu else value
        else:
            g = float64(dy[a, channel, r, s])
            if mode != GRADIENT:
                pre = _pre_activation(
                    x[a, channel, r, s], z[a, channel, r, s], c0, coeffs[MASK_SCALE, channel],
                    coeffs[MASK_SHIFT, channel], residual,
                )  # fmt: skip
                if pre <= 0.0:  # NaN passes dy on, as PyTorch's ReLU backward does
                    g = 0.0
                if residual:
                    dz[a, channel, r, s] = g
            if mode == MASKED_SCALE:
                out[a, channel, r, s] = g * c1  # 0 * (x - c0) would be NaN for infinite x
            else:
                out[a, channel, r, s] = (g + c2 * centred + c3) * c1
        k += step
        a, r, s = _advance(a, r, s, da, dr, ds, n_r, n_s)


@_kernel
def running_coefficients(running_mean, running_var, weight, bias, eps, coeffs):
    """Evaluation coefficients ``[mean, invstd, weight * invstd, bias]`` from running statistics."""
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        invstd, scale = _scale_channel(float64(running_var[c]), float64(weight[c]), eps)
        coeffs[MEAN, c] = float64(running_mean[c])
        coeffs[INVSTD, c] = invstd
        coeffs[SCALE, c] = scale
        coeffs[SHIFT, c] = float64(bias[c])


@_kernel
def batch_coefficients(
    mean, m2, count, weight, bias, eps, running_mean, running_var, momentum, coeffs
):  # fmt: skip
    """Training coefficients ``[mean, invstd, scale, shift]`` from statistics merged elsewhere.

    ``mean`` and ``m2`` cover ``count`` values per channel (every rank's or
    chunk's). Updates the running statistics in place when ``momentum`` is not
    negative, as :func:`forward_statistics` does.
    """
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        invstd, scale = _scale_channel(m2[c] / count, float64(weight[c]), eps)
        coeffs[MEAN, c] = mean[c]
        coeffs[INVSTD, c] = invstd
        coeffs[SCALE, c] = scale
        coeffs[SHIFT, c] = float64(bias[c])
        if momentum >= 0.0:
            unbiased = _unbiased_variance(m2[c], count)
            running_mean[c] = _running_average(float64(running_mean[c]), mean[c], momentum)
            running_var[c] = _running_average(float64(running_var[c]), unbiased, momentum)


@_kernel
def gradient_coefficients(sums, count, mean, invstd, weight, coeffs):
    """``GRADIENT`` coefficients from ``sums = [sum(dy), sum(dy * (x - mean))]`` over ``count``."""
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        alpha, beta, gamma = _backward_channel(
            sums[0, c], sums[1, c], count, invstd[c], float64(weight[c])
        )
        coeffs[MEAN, c] = mean[c]
        coeffs[ALPHA, c] = alpha
        coeffs[BETA, c] = beta
        coeffs[GAMMA, c] = gamma


@_kernel
def gradient_scale(invstd, weight, coeffs):
    """The ``AFFINE`` coefficients ``c0 = 0, c2 = weight * invstd, c3 = 0``: ``dx = dy * c2``."""
    c = cuda.grid(1)
    if c < coeffs.shape[1]:
        coeffs[MEAN, c] = 0.0
        coeffs[SCALE, c] = float64(weight[c]) * invstd[c]
        coeffs[SHIFT, c] = 0.0


@_kernel
def accumulate(target, source):
    """``target += source`` for vectors."""
    i = cuda.grid(1)
    if i < target.shape[0]:
        target[i] += source[i]


@_kernel
def copy_5d(source, target):
    """``target[...] = source`` for 5-D arrays of any strides (a staging copy)."""
    i = cuda.grid(1)
    n4 = target.shape[4]
    n3 = target.shape[3]
    n2 = target.shape[2]
    n1 = target.shape[1]
    if i >= n1 * n2 * n3 * n4 * target.shape[0]:
        return
    i4 = i % n4
    i //= n4
    i3 = i % n3
    i //= n3
    i2 = i % n2
    i //= n2
    i1 = i % n1
    i0 = i // n1
    target[i0, i1, i2, i3, i4] = source[i0, i1, i2, i3, i4]
