"""Numba CPU kernels.

Each kernel works on a canonical view of the data, in one of two layouts:

* planar ``(A, C, R, S)``: every channel is a set of ``A * R`` rows of ``S``
  elements (NCHW and its slices; ``S`` is the innermost, usually contiguous, axis);
* channels-inner ``(P, C)``: ``P`` positions of ``C`` adjacent channels
  (channels-last data and ``(N, C)`` matrices).

Work items are (channel block, tile) pairs whose bounds depend only on the shape,
never on the number of threads. Channel blocks make each item read memory in
runs of a few kilobytes even when rows are short (7x7 feature maps). Reductions
write one partial per (channel, tile), summed afterwards in a fixed order, so
results are bit-for-bit identical whatever the thread count.

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
def _planar_item(item, shape, channel_block, row_block, s_chunk, n_tiles):
    """Bounds of work item ``item``: ``(tile, c0, c1, row0, row1, s0, s1)``."""
    n_a, n_channels, n_r, n_s = shape
    block = item // n_tiles
    tile = item - block * n_tiles
    n_chunks = (n_s + s_chunk - 1) // s_chunk
    row_tile = tile // n_chunks
    chunk = tile - row_tile * n_chunks
    c0 = block * channel_block
    row0 = row_tile * row_block
    s0 = chunk * s_chunk
    return (
        tile,
        c0,
        min(n_channels, c0 + channel_block),
        row0,
        min(n_a * n_r, row0 + row_block),
        s0,
        min(n_s, s0 + s_chunk),
    )


def _n_items(n_channels, channel_block, n_tiles):
    return (n_channels + channel_block - 1) // channel_block * n_tiles


def _planar_sums(u, v, u_shift, v_shift, channel_block, row_block, s_chunk, n_tiles, partials):
    """Per (channel, tile): ``sum(v - kv)`` and ``sum((v - kv) * (u - ku))`` into ``partials[c, t]``."""
    n_r = u.shape[2]
    for item in prange(_n_items(u.shape[1], channel_block, n_tiles)):
        tile, c0, c1, row0, row1, s0, s1 = _planar_item(
            item, u.shape, channel_block, row_block, s_chunk, n_tiles
        )
        sum_v = np.zeros(c1 - c0)
        sum_vu = np.zeros(c1 - c0)
        for q in range(row0, row1):
            a = q // n_r
            r = q - a * n_r
            for c in range(c0, c1):
                ku = u_shift[c]
                kv = v_shift[c]
                # Row slices keep the inner loop simple enough for LLVM to vectorise.
                u_row = u[a, c, r, s0:s1]
                v_row = v[a, c, r, s0:s1]
                row_v = 0.0
                row_vu = 0.0
                for s in range(u_row.shape[0]):
                    dv = np.float64(v_row[s]) - kv
                    row_v += dv
                    row_vu += dv * (np.float64(u_row[s]) - ku)
                sum_v[c - c0] += row_v
                sum_vu[c - c0] += row_vu
        for c in range(c0, c1):
            partials[c, tile, 0] = sum_v[c - c0]
            partials[c, tile, 1] = sum_vu[c - c0]


def _channels_inner_sums(u, v, u_shift, v_shift, channel_block, row_block, n_tiles, partials):
    """Channels-inner version of :func:`_planar_sums`; ``partials`` is ``(T, 2, C)``."""
    n_pos, n_channels = u.shape
    for item in prange(_n_items(n_channels, channel_block, n_tiles)):
        block = item // n_tiles
        tile = item - block * n_tiles
        c0 = block * channel_block
        c1 = min(n_channels, c0 + channel_block)
        ku = u_shift[c0:c1]
        kv = v_shift[c0:c1]
        sum_v = np.zeros(c1 - c0)
        sum_vu = np.zeros(c1 - c0)
        for p in range(tile * row_block, min(n_pos, (tile + 1) * row_block)):
            u_row = u[p, c0:c1]
            v_row = v[p, c0:c1]
            for c in range(c1 - c0):
                dv = np.float64(v_row[c]) - kv[c]
                sum_v[c] += dv
                sum_vu[c] += dv * (np.float64(u_row[c]) - ku[c])
        partials[tile, 0, c0:c1] = sum_v
        partials[tile, 1, c0:c1] = sum_vu


def _planar_affine(x, mean, scale, shift, channel_block, row_block, s_chunk, n_tiles, out):
    """``out = (x - mean) * scale + shift`` per channel, computed in float64."""
    n_r = x.shape[2]
    for item in prange(_n_items(x.shape[1], channel_block, n_tiles)):
        _, c0, c1, row0, row1, s0, s1 = _planar_item(
            item, x.shape, channel_block, row_block, s_chunk, n_tiles
        )
        for q in range(row0, row1):
            a = q // n_r
            r = q - a * n_r
            for c in range(c0, c1):
                m = mean[c]
                k = scale[c]
                b = shift[c]
                x_row = x[a, c, r, s0:s1]
                out_row = out[a, c, r, s0:s1]
                for s in range(x_row.shape[0]):
                    out_row[s] = (np.float64(x_row[s]) - m) * k + b


def _channels_inner_affine(x, mean, scale, shift, channel_block, row_block, n_tiles, out):
    """Channels-inner version of :func:`_planar_affine`."""
    n_pos, n_channels = x.shape
    for item in prange(_n_items(n_channels, channel_block, n_tiles)):
        block = item // n_tiles
        tile = item - block * n_tiles
        c0 = block * channel_block
        c1 = min(n_channels, c0 + channel_block)
        m = mean[c0:c1]
        k = scale[c0:c1]
        b = shift[c0:c1]
        for p in range(tile * row_block, min(n_pos, (tile + 1) * row_block)):
            x_row = x[p, c0:c1]
            out_row = out[p, c0:c1]
            for c in range(c1 - c0):
                out_row[c] = (np.float64(x_row[c]) - m[c]) * k[c] + b[c]


def _planar_grad(dy, x, mean, alpha, beta, gamma, channel_block, row_block, s_chunk, n_tiles, out):
    """``out = alpha * dy + beta * (x - mean) + gamma`` per channel, in float64."""
    n_r = x.shape[2]
    for item in prange(_n_items(x.shape[1], channel_block, n_tiles)):
        _, c0, c1, row0, row1, s0, s1 = _planar_item(
            item, x.shape, channel_block, row_block, s_chunk, n_tiles
        )
        for q in range(row0, row1):
            a = q // n_r
            r = q - a * n_r
            for c in range(c0, c1):
                m = mean[c]
                ka = alpha[c]
                kb = beta[c]
                kg = gamma[c]
                dy_row = dy[a, c, r, s0:s1]
                x_row = x[a, c, r, s0:s1]
                out_row = out[a, c, r, s0:s1]
                for s in range(x_row.shape[0]):
                    out_row[s] = ka * np.float64(dy_row[s]) + kb * (np.float64(x_row[s]) - m) + kg


def _channels_inner_grad(dy, x, mean, alpha, beta, gamma, channel_block, row_block, n_tiles, out):
    """Channels-inner version of :func:`_planar_grad`."""
    n_pos, n_channels = x.shape
    for item in prange(_n_items(n_channels, channel_block, n_tiles)):
        block = item // n_tiles
        tile = item - block * n_tiles
        c0 = block * channel_block
        c1 = min(n_channels, c0 + channel_block)
        m = mean[c0:c1]
        ka = alpha[c0:c1]
        kb = beta[c0:c1]
        kg = gamma[c0:c1]
        for p in range(tile * row_block, min(n_pos, (tile + 1) * row_block)):
            dy_row = dy[p, c0:c1]
            x_row = x[p, c0:c1]
            out_row = out[p, c0:c1]
            for c in range(c1 - c0):
                out_row[c] = (
                    ka[c] * np.float64(dy_row[c]) + kb[c] * (np.float64(x_row[c]) - m[c]) + kg[c]
                )


_n_items = njit(cache=True, inline="always")(_n_items)

planar_sums = _compile_pair(_planar_sums)
channels_inner_sums = _compile_pair(_channels_inner_sums)
planar_affine = _compile_pair(_planar_affine)
channels_inner_affine = _compile_pair(_channels_inner_affine)
planar_grad = _compile_pair(_planar_grad)
channels_inner_grad = _compile_pair(_channels_inner_grad)
