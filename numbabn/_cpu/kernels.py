"""Numba CPU kernels.

Each kernel works on a canonical view of the data, in one of two layouts:

* planar ``(A, C, R, S)``: every channel is a set of ``A * R`` rows of ``S``
  elements (NCHW and its slices; ``S`` is the innermost, usually contiguous, axis);
* channels-inner ``(P, C)``: ``P`` positions of ``C`` adjacent channels
  (channels-last data and ``(N, C)`` matrices).

Work is split into tiles whose bounds depend only on the shape, never on the
number of threads. Reductions write one partial per (channel, tile) and the
partials are summed afterwards in a fixed order, so results are bit-for-bit
identical whatever the thread count.

Every kernel is compiled twice: a parallel version for large tensors and a
serial one for small tensors, where entering a parallel region costs more than
it saves. Both run the same code in the same order and give identical results.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

# ``reassoc`` lets LLVM vectorise floating-point reductions. ``nnan``/``ninf``
# are left out on purpose so NaN and inf propagate as in PyTorch.
_FASTMATH = {"reassoc", "contract", "nsz"}


def _compile_pair(func):
    """Compile ``func`` as a (parallel, serial) pair of cached Numba dispatchers."""
    # Numba names cache files after the function's qualified name, so the serial
    # copy gets a name of its own to keep the two compilations apart on disk.
    serial_func = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + "_serial", func.__defaults__
    )
    serial_func.__qualname__ = func.__qualname__ + "_serial"
    options = {"fastmath": _FASTMATH, "cache": True, "nogil": True}
    return njit(parallel=True, **options)(func), njit(**options)(serial_func)


@njit(cache=True, inline="always")
def _planar_tile(t, n_rows, row_block, s_chunk, n_s, n_chunks):
    """Bounds ``(row0, row1, s0, s1)`` of tile ``t`` of a planar channel."""
    block = t // n_chunks
    chunk = t - block * n_chunks
    row0 = block * row_block
    row1 = min(n_rows, row0 + row_block)
    s0 = chunk * s_chunk
    s1 = min(n_s, s0 + s_chunk)
    return row0, row1, s0, s1


def _planar_sums(u, v, u_shift, v_shift, row_block, s_chunk, n_tiles, partials):
    """Per tile of each channel: ``sum(v - kv)`` and ``sum((v - kv) * (u - ku))``."""
    _, n_channels, n_r, n_s = u.shape
    n_rows = u.shape[0] * n_r
    n_chunks = (n_s + s_chunk - 1) // s_chunk
    for item in prange(n_channels * n_tiles):
        c = item // n_tiles
        t = item - c * n_tiles
        row0, row1, s0, s1 = _planar_tile(t, n_rows, row_block, s_chunk, n_s, n_chunks)
        ku = u_shift[c]
        kv = v_shift[c]
        sum_v = 0.0
        sum_vu = 0.0
        for q in range(row0, row1):
            a = q // n_r
            r = q - a * n_r
            for s in range(s0, s1):
                dv = np.float64(v[a, c, r, s]) - kv
                sum_v += dv
                sum_vu += dv * (np.float64(u[a, c, r, s]) - ku)
        partials[c, t, 0] = sum_v
        partials[c, t, 1] = sum_vu


def _channels_inner_sums(u, v, u_shift, v_shift, row_block, n_tiles, partials):
    """Channels-inner version of :func:`_planar_sums`."""
    n_pos, n_channels = u.shape
    for t in prange(n_tiles):
        p0 = t * row_block
        p1 = min(n_pos, p0 + row_block)
        sum_v = np.zeros(n_channels)
        sum_vu = np.zeros(n_channels)
        for p in range(p0, p1):
            for c in range(n_channels):
                dv = np.float64(v[p, c]) - v_shift[c]
                sum_v[c] += dv
                sum_vu[c] += dv * (np.float64(u[p, c]) - u_shift[c])
        for c in range(n_channels):
            partials[c, t, 0] = sum_v[c]
            partials[c, t, 1] = sum_vu[c]


def _planar_affine(x, mean, scale, shift, row_block, s_chunk, n_tiles, out):
    """``out = (x - mean) * scale + shift`` per channel, computed in float64."""
    _, n_channels, n_r, n_s = x.shape
    n_rows = x.shape[0] * n_r
    n_chunks = (n_s + s_chunk - 1) // s_chunk
    for item in prange(n_channels * n_tiles):
        c = item // n_tiles
        t = item - c * n_tiles
        row0, row1, s0, s1 = _planar_tile(t, n_rows, row_block, s_chunk, n_s, n_chunks)
        m = mean[c]
        k = scale[c]
        b = shift[c]
        for q in range(row0, row1):
            a = q // n_r
            r = q - a * n_r
            for s in range(s0, s1):
                out[a, c, r, s] = (np.float64(x[a, c, r, s]) - m) * k + b


def _channels_inner_affine(x, mean, scale, shift, row_block, n_tiles, out):
    """Channels-inner version of :func:`_planar_affine`."""
    n_pos, n_channels = x.shape
    for t in prange(n_tiles):
        for p in range(t * row_block, min(n_pos, (t + 1) * row_block)):
            for c in range(n_channels):
                out[p, c] = (np.float64(x[p, c]) - mean[c]) * scale[c] + shift[c]


def _planar_grad(dy, x, mean, alpha, beta, gamma, row_block, s_chunk, n_tiles, out):
    """``out = alpha * dy + beta * (x - mean) + gamma`` per channel, in float64."""
    _, n_channels, n_r, n_s = x.shape
    n_rows = x.shape[0] * n_r
    n_chunks = (n_s + s_chunk - 1) // s_chunk
    for item in prange(n_channels * n_tiles):
        c = item // n_tiles
        t = item - c * n_tiles
        row0, row1, s0, s1 = _planar_tile(t, n_rows, row_block, s_chunk, n_s, n_chunks)
        m = mean[c]
        ka = alpha[c]
        kb = beta[c]
        kg = gamma[c]
        for q in range(row0, row1):
            a = q // n_r
            r = q - a * n_r
            for s in range(s0, s1):
                out[a, c, r, s] = (
                    ka * np.float64(dy[a, c, r, s]) + kb * (np.float64(x[a, c, r, s]) - m) + kg
                )


def _channels_inner_grad(dy, x, mean, alpha, beta, gamma, row_block, n_tiles, out):
    """Channels-inner version of :func:`_planar_grad`."""
    n_pos, n_channels = x.shape
    for t in prange(n_tiles):
        for p in range(t * row_block, min(n_pos, (t + 1) * row_block)):
            for c in range(n_channels):
                out[p, c] = (
                    alpha[c] * np.float64(dy[p, c])
                    + beta[c] * (np.float64(x[p, c]) - mean[c])
                    + gamma[c]
                )


planar_sums = _compile_pair(_planar_sums)
channels_inner_sums = _compile_pair(_channels_inner_sums)
planar_affine = _compile_pair(_planar_affine)
channels_inner_affine = _compile_pair(_channels_inner_affine)
planar_grad = _compile_pair(_planar_grad)
channels_inner_grad = _compile_pair(_channels_inner_grad)
