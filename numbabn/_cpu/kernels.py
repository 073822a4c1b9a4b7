"""Numba CPU kernels.

Every operand is a 4-D canonical view (see :mod:`numbabn._views`):

* planar ``(A, C, R, S)``: each channel is ``A * R`` rows of ``S`` elements
  (NCHW and its slices; ``S`` is the innermost, usually contiguous, axis);
* channels-inner ``(P, 1, 1, C)``: ``P`` positions of ``C`` adjacent channels
  (channels-last data and ``(N, C)`` matrices); the channel axis is last there so
  that a row of channels is a contiguous slice that LLVM vectorises.

Work items are (channel block, tile) pairs whose bounds depend only on the shape,
never on the number of threads. Channel blocks make each planar item read memory
in runs of kilobytes even when rows are short (7x7 feature maps); a channels-inner
item takes whole rows of positions, which are runs of memory themselves. The
elementwise passes group narrow channels-inner rows: ``lane_rows`` adjacent
positions (the geometry's third entry there) make one row of lanes, at least
:data:`numbabn._tunables.LANE_ELEMENTS` long, which C-contiguous operands walk as
one flat run, so that inner loops stay long. Reductions write one partial per
(tile, channel); the partials are then summed in a fixed order, so results are
bit-for-bit identical whatever the thread count.

The ``*_items`` kernels run a range of items: small tensors all of them in one
call on the calling thread, larger ones spread over Numba's threads by
:mod:`numbabn._cpu.parallel`. Both run the same compiled code, and each kernel
is compiled for one family of views only (planar or channels-inner), so a
first call compiles only what it runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba.extending import overload

from numbabn import _coefficients
from numbabn._cpu.halves import narrowed, widen
from numbabn._cpu.jit import inline as _inline
from numbabn._cpu.jit import kernel as _kernel
from numbabn._cpu.jit import shared as _shared

# The per-channel arithmetic, shared with the CUDA kernels (see numbabn._coefficients).
_channel_moments = _inline(_coefficients.channel_moments)
_scale_channel = _inline(_coefficients.scale_channel)
_running_average = _inline(_coefficients.running_average)
_unbiased_variance = _inline(_coefficients.unbiased_variance)
_backward_channel = _inline(_coefficients.backward_channel)
_merged_channel = _inline(_coefficients.merged_channel)


@_inline
def _bounds(item, shape, channels_inner, geometry):
    """Bounds of work item ``item``: ``(tile, c0, c1, row0, row1, s0, s1)``.

    Rows run over ``A * R`` (planar) or over the positions (channels-inner).
    """
    channel_block, row_block, s_chunk, n_tiles = geometry
    if channels_inner:
        n_rows, n_channels, n_s = shape[0], shape[3], 1
    else:
        n_rows, n_channels, n_s = shape[0] * shape[2], shape[1], shape[3]
    block = item // n_tiles
    tile = item - block * n_tiles
    n_chunks = (n_s + s_chunk - 1) // s_chunk
    row_tile = tile // n_chunks
    chunk = tile - row_tile * n_chunks
    c0 = block * channel_block
    row0 = row_tile * row_block
    s0 = chunk * s_chunk
    c1 = min(n_channels, c0 + channel_block)
    return tile, c0, c1, row0, min(n_rows, row0 + row_block), s0, min(n_s, s0 + s_chunk)


@_inline
def _row(x, a, c, r, s0, s1, whole):
    """Row ``(a, c, r)`` of a planar view, elements ``s0`` to ``s1``.

    A whole row is indexed rather than sliced: the elementwise passes run 15-33%
    faster that way on 7x7 rows. (The reductions do not gain, and keep slices.)
    """
    return x[a, c, r] if whole else x[a, c, r, s0:s1]


@_inline
def _square_sums(v_row, kv, sum_v, sum_vu):
    """Add one position's ``v - kv`` and its square to the per-channel sums."""
    for c in range(v_row.shape[0]):
        dv = widen(v_row[c]) - kv[c]
        sum_v[c] += dv
        sum_vu[c] += dv * dv


@_inline
def _square_pair_sums(v_a, v_b, kv, sum_v, sum_vu):
    """:func:`_square_sums` for two positions at once."""
    for c in range(v_a.shape[0]):
        da = widen(v_a[c]) - kv[c]
        db = widen(v_b[c]) - kv[c]
        sum_v[c] += da + db
        sum_vu[c] += da * da + db * db


@_inline
def _cross_sums(v_row, u_row, kv, ku, sum_v, sum_vu):
    """Add one position's ``v - kv`` and ``(v - kv) * (u - ku)`` to the per-channel sums."""
    for c in range(v_row.shape[0]):
        dv = widen(v_row[c]) - kv[c]
        sum_v[c] += dv
        sum_vu[c] += dv * (widen(u_row[c]) - ku[c])


@_inline
def _finite_or_zero(shift):
    """A shift of the sums (``kv``), in float64: a non-finite one counts as 0.

    The statistics shift by each channel's first value; ``inf - inf`` would make
    the mean NaN where PyTorch's is infinite.
    """
    value = np.float64(shift)
    return value if np.isfinite(value) else 0.0


def _is_flat(x):
    """Whether a 4-D operand is typed C-contiguous, so that :func:`_flat` can view it."""
    raise NotImplementedError  # stands in for Python; compiled code takes the overload


def _flat(x):
    """A C-contiguous 4-D operand as one flat run (compiled code only; see :func:`_is_flat`)."""
    raise NotImplementedError


@overload(_is_flat)
def _is_flat_overload(x):
    contiguous = x.layout == "C"
    return lambda x: contiguous


@overload(_flat)
def _flat_overload(x):
    if x.layout == "C":
        return lambda x: x.reshape(x.size)
    # Typed only: callers take this branch for C-contiguous operands alone.
    return lambda x: x[0, 0, 0, :]


@_inline
def _lane_group(flat, p, n_c, width):
    """Positions ``p`` onwards of a flat channels-inner operand: one row of ``width`` lanes."""
    return flat[p * n_c : p * n_c + width]


@_inline
def _lanes(vector, c0, n_c, width):
    """``vector[c0:c0 + n_c]`` repeated over ``width`` lanes, in float64."""
    lanes = np.empty(width)
    for j in range(width):
        lanes[j] = vector[c0 + j % n_c]
    return lanes


@_inline
def _sums_channels_inner(u, v, u_shift, v_shift, squares, bounds, partials):
    """Channels-inner item's ``sum(v - kv)`` and ``sum((v - kv) * (u - ku))`` into partials.

    ``kv`` is ``v_shift`` with non-finite values as 0 (see :func:`_finite_or_zero`).

    With ``squares`` (``u`` is ``v``, ``ku`` is ``kv``) the second sum is
    ``sum((v - kv) ** 2)`` and ``u`` is never read: half the loads and
    conversions, which short rows feel.
    """
    tile, c0, c1, row0, row1, _, _ = bounds
    sum_v = np.zeros(c1 - c0)
    sum_vu = np.zeros(c1 - c0)
    kv = np.empty(c1 - c0)
    for c in range(c1 - c0):
        kv[c] = _finite_or_zero(v_shift[c0 + c])
    # The branch on ``squares`` stays outside the position loops: rows are short
    # enough that slicing an unused ``u`` row per position would cost a third.
    if squares:
        # Positions go two at a time: the per-channel sums live in memory (a row
        # of channels is too wide for registers), and pairs halve their loads and
        # stores. (Pairs of the two-input sums measured slower: four streams.)
        pairs_end = row1 - (row1 - row0) % 2
        for p in range(row0, pairs_end, 2):
            _square_pair_sums(v[p, 0, 0, c0:c1], v[p + 1, 0, 0, c0:c1], kv, sum_v, sum_vu)
        for p in range(pairs_end, row1):
            _square_sums(v[p, 0, 0, c0:c1], kv, sum_v, sum_vu)
    else:
        ku = u_shift[c0:c1]
        for p in range(row0, row1):
            _cross_sums(v[p, 0, 0, c0:c1], u[p, 0, 0, c0:c1], kv, ku, sum_v, sum_vu)
    _store_partials(partials, tile, c0, sum_v, sum_vu)


@_inline
def _sums_planar(u, v, u_shift, v_shift, squares, bounds, partials):
    """:func:`_sums_channels_inner` for a planar item."""
    tile, c0, c1, row0, row1, s0, s1 = bounds
    n_r = v.shape[2]
    a0 = row0 // n_r
    r0 = row0 - a0 * n_r
    for c in range(c0, c1):
        ku = u_shift[c]
        kv = _finite_or_zero(v_shift[c])
        acc_v = 0.0
        acc_vu = 0.0
        # Row q is (a, r); stepped rather than divided, as rows can be short.
        a = a0
        r = r0
        for _ in range(row0, row1):
            # Row slices keep the inner loop simple enough for LLVM to vectorise.
            v_row = v[a, c, r, s0:s1]
            # Each row sums from zero, so its vector loop need not wait for the
            # previous row's horizontal sum (3-9% faster, most on short rows).
            row_v = 0.0
            row_vu = 0.0
            if squares:
                for s in range(v_row.shape[0]):
                    dv = widen(v_row[s]) - kv
                    row_v += dv
                    row_vu += dv * dv
            else:
                u_row = u[a, c, r, s0:s1]
                for s in range(v_row.shape[0]):
                    dv = widen(v_row[s]) - kv
                    row_v += dv
                    row_vu += dv * (widen(u_row[s]) - ku)
            acc_v += row_v
            acc_vu += row_vu
            r += 1
            if r == n_r:
                r = 0
                a += 1
        partials[tile, 0, c] = acc_v
        partials[tile, 1, c] = acc_vu


@_inline
def _store_partials(partials, tile, c0, sum_a, sum_b):
    """Write an item's two per-channel sums to ``partials[tile, :, c0:]``.

    An element loop, not a slice assignment: Numba's array-to-slice assignment
    drags in shape checks whose error formatting costs seconds of compilation.
    """
    for i in range(sum_a.shape[0]):
        partials[tile, 0, c0 + i] = sum_a[i]
        partials[tile, 1, c0 + i] = sum_b[i]


@_inline
def _affine_channels_inner(x, mean, scale, shift, bounds, lane_rows, out):
    """``out = (x - mean) * scale + shift`` per channel over a channels-inner item, in float64."""
    _, c0, c1, row0, row1, _, _ = bounds
    if lane_rows == 1:
        _affine_positions(x, mean[c0:c1], scale[c0:c1], shift[c0:c1], bounds, row0, out)
    else:
        n_c = c1 - c0
        width = lane_rows * n_c
        m = _lanes(mean, c0, n_c, width)
        k = _lanes(scale, c0, n_c, width)
        b = _lanes(shift, c0, n_c, width)
        grouped_end = row0
        if _is_flat(x) and _is_flat(out):
            x_flat, out_flat = _flat(x), _flat(out)
            grouped_end = row0 + (row1 - row0) // lane_rows * lane_rows
            for p in range(row0, grouped_end, lane_rows):
                _affine_run(
                    _lane_group(x_flat, p, n_c, width), m, k, b,
                    _lane_group(out_flat, p, n_c, width),
                )  # fmt: skip
        _affine_positions(x, m, k, b, bounds, grouped_end, out)


@_inline
def _affine_positions(x, m, k, b, bounds, first, out):
    """:func:`_affine_channels_inner` a position at a time, from ``first`` to the item's end."""
    _, c0, c1, _, row1, _, _ = bounds
    for p in range(first, row1):
        _affine_run(x[p, 0, 0, c0:c1], m, k, b, out[p, 0, 0, c0:c1])


@_inline
def _affine_run(x_run, m, k, b, out_run):
    """``out_run = (x_run - m) * k + b`` elementwise, ``m``, ``k``, ``b`` lane by lane."""
    for j in range(x_run.shape[0]):
        out_run[j] = narrowed((widen(x_run[j]) - m[j]) * k[j] + b[j], out_run)


@_inline
def _affine_planar(x, mean, scale, shift, bounds, out):
    """:func:`_affine_channels_inner` over a planar item."""
    _, c0, c1, row0, row1, s0, s1 = bounds
    n_r = x.shape[2]
    whole = s1 - s0 == x.shape[3]
    # Row q is (a, r); stepped rather than divided, as rows can be short.
    a = row0 // n_r
    r = row0 - a * n_r
    for _ in range(row0, row1):
        for c in range(c0, c1):
            m = mean[c]
            k = scale[c]
            b = shift[c]
            x_row = _row(x, a, c, r, s0, s1, whole)
            out_row = _row(out, a, c, r, s0, s1, whole)
            for s in range(x_row.shape[0]):
                out_row[s] = narrowed((widen(x_row[s]) - m) * k + b, out_row)
        r += 1
        if r == n_r:
            r = 0
            a += 1


@_inline
def _grad_channels_inner(dy, x, mean, alpha, beta, gamma, bounds, lane_rows, out):
    """``out = (dy + beta * (x - mean) + gamma) * alpha`` over a channels-inner item.

    In float64. ``alpha`` (the weight times invstd) multiplies last, as in
    PyTorch: with an infinite weight the gradient is then infinite rather than
    ``inf - inf``.
    """
    _, c0, c1, row0, row1, _, _ = bounds
    if lane_rows == 1:
        _grad_positions(
            dy, x, mean[c0:c1], alpha[c0:c1], beta[c0:c1], gamma[c0:c1], bounds, row0, out
        )
    else:
        n_c = c1 - c0
        width = lane_rows * n_c
        m = _lanes(mean, c0, n_c, width)
        ka = _lanes(alpha, c0, n_c, width)
        kb = _lanes(beta, c0, n_c, width)
        kg = _lanes(gamma, c0, n_c, width)
        grouped_end = row0
        if _is_flat(dy) and _is_flat(x) and _is_flat(out):
            dy_flat, x_flat, out_flat = _flat(dy), _flat(x), _flat(out)
            grouped_end = row0 + (row1 - row0) // lane_rows * lane_rows
            for p in range(row0, grouped_end, lane_rows):
                _grad_run(
                    _lane_group(dy_flat, p, n_c, width), _lane_group(x_flat, p, n_c, width), m,
                    ka, kb, kg, _lane_group(out_flat, p, n_c, width),
                )  # fmt: skip
        _grad_positions(dy, x, m, ka, kb, kg, bounds, grouped_end, out)


@_inline
def _grad_positions(dy, x, m, ka, kb, kg, bounds, first, out):
    """:func:`_grad_channels_inner` a position at a time, from ``first`` to the item's end."""
    _, c0, c1, _, row1, _, _ = bounds
    for p in range(first, row1):
        _grad_run(dy[p, 0, 0, c0:c1], x[p, 0, 0, c0:c1], m, ka, kb, kg, out[p, 0, 0, c0:c1])


@_inline
def _grad_run(dy_run, x_run, m, ka, kb, kg, out_run):
    """:func:`_grad_channels_inner`'s formula elementwise over a run, coefficients lane by lane."""
    for j in range(x_run.shape[0]):
        value = (widen(dy_run[j]) + kb[j] * (widen(x_run[j]) - m[j]) + kg[j]) * ka[j]
        out_run[j] = narrowed(value, out_run)


@_inline
def _grad_planar(dy, x, mean, alpha, beta, gamma, bounds, out):
    """:func:`_grad_channels_inner` over a planar item."""
    _, c0, c1, row0, row1, s0, s1 = bounds
    n_r = x.shape[2]
    whole = s1 - s0 == x.shape[3]
    # Row q is (a, r); stepped rather than divided, as rows can be short.
    a = row0 // n_r
    r = row0 - a * n_r
    for _ in range(row0, row1):
        for c in range(c0, c1):
            m = mean[c]
            ka = alpha[c]
            kb = beta[c]
            kg = gamma[c]
            dy_row = _row(dy, a, c, r, s0, s1, whole)
            x_row = _row(x, a, c, r, s0, s1, whole)
            out_row = _row(out, a, c, r, s0, s1, whole)
            for s in range(x_row.shape[0]):
                value = (widen(dy_row[s]) + kb * (widen(x_row[s]) - m) + kg) * ka
                out_row[s] = narrowed(value, out_row)
        r += 1
        if r == n_r:
            r = 0
            a += 1


# Each kernel below is compiled for one family of views (``channels_inner`` a
# constant of the closure, so Numba prunes the other family's code before it
# types anything: half the code to compile). The tuples below are indexed by
# ``numbabn._views.Family``.


def _sums_kernel(channels_inner: bool) -> Any:
    @_kernel
    def sums_items(u, v, u_shift, v_shift, squares, geometry, partials, start, stop):
        """Items ``start`` to ``stop`` of ``sum(v - kv)``, ``sum((v - kv) * (u - ku))``."""
        for item in range(start, stop):
            bounds = _bounds(item, v.shape, channels_inner, geometry)
            if channels_inner:
                _sums_channels_inner(u, v, u_shift, v_shift, squares, bounds, partials)
            else:
                _sums_planar(u, v, u_shift, v_shift, squares, bounds, partials)

    return sums_items


def _affine_kernel(channels_inner: bool) -> Any:
    @_kernel
    def affine_items(x, mean, scale, shift, geometry, out, start, stop):
        """Items ``start`` to ``stop`` of ``out = (x - mean) * scale + shift``."""
        for item in range(start, stop):
            bounds = _bounds(item, x.shape, channels_inner, geometry)
            if channels_inner:
                _affine_channels_inner(x, mean, scale, shift, bounds, geometry[2], out)
            else:
                _affine_planar(x, mean, scale, shift, bounds, out)

    return affine_items


def _grad_kernel(channels_inner: bool) -> Any:
    @_kernel
    def grad_items(dy, x, mean, alpha, beta, gamma, geometry, out, start, stop):
        """Items ``start`` to ``stop`` of ``out = (dy + beta * (x - mean) + gamma) * alpha``."""
        for item in range(start, stop):
            bounds = _bounds(item, x.shape, channels_inner, geometry)
            if channels_inner:
                _grad_channels_inner(dy, x, mean, alpha, beta, gamma, bounds, geometry[2], out)
            else:
                _grad_planar(dy, x, mean, alpha, beta, gamma, bounds, out)

    return grad_items


# Module globals, so that the drivers of numbabn._cpu.parallel can call them by name.
sums_planar, sums_channels_inner = _sums_kernel(False), _sums_kernel(True)
affine_planar, affine_channels_inner = _affine_kernel(False), _affine_kernel(True)
grad_planar, grad_channels_inner = _grad_kernel(False), _grad_kernel(True)
SUMS = (sums_planar, sums_channels_inner)
AFFINE = (affine_planar, affine_channels_inner)
GRAD = (grad_planar, grad_channels_inner)


@_kernel
def transpose_items(src, dst, block, inner_on_dst, start, stop):
    """Items ``start`` to ``stop`` of ``dst[n, j, 0, i] = src[n, i, 0, j]``.

    Each array is viewed in its own memory order, ``(N, P, 1, C)`` for
    channels-last and ``(N, C, 1, P)`` for NCHW, so that the canonical layouts
    are C-contiguous views and take the kernel's C-contiguous variant. Each item
    copies a ``block`` x ``block`` tile of one ``n``. The inner loop walks the
    last axis of ``dst`` if ``inner_on_dst``, else that of ``src``.
    """
    n_i = (src.shape[1] + block - 1) // block
    n_j = (src.shape[3] + block - 1) // block
    for item in range(start, stop):
        n = item // (n_i * n_j)
        tile = item - n * n_i * n_j
        i0 = tile // n_j * block
        j0 = (tile - tile // n_j * n_j) * block
        i1, j1 = min(src.shape[1], i0 + block), min(src.shape[3], j0 + block)
        # One-dimensional views per inner loop: LLVM then hoists the indexing.
        if inner_on_dst:
            for j in range(j0, j1):
                written, read = dst[n, j, 0, i0:i1], src[n, i0:i1, 0, j]
                for k in range(i1 - i0):
                    written[k] = read[k]
        else:
            for i in range(i0, i1):
                written, read = dst[n, j0:j1, 0, i], src[n, i, 0, j0:j1]
                for k in range(j1 - j0):
                    written[k] = read[k]


@_shared
def moments_from_sums(totals, shift, count):
    """Per-channel float64 ``(mean, M2)`` from sums taken around ``shift``.

    A non-finite shift counts as 0, as in the sums (:func:`_finite_or_zero`).
    """
    mean = np.empty(shift.shape[0])
    m2 = np.empty(shift.shape[0])
    for c in range(shift.shape[0]):
        mean[c], m2[c] = _channel_moments(
            totals[0, c], totals[1, c], _finite_or_zero(shift[c]), count
        )
    return mean, m2


# The merges are called from Python too, and compiled without fast-math: Chan's
# formulas as written, the same bits as the same formulas in NumPy.
@_inline
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Per-channel ``(mean, M2)`` of two sets of statistics merged, as new arrays."""
    mean = np.empty(mean_a.shape[0])
    m2 = np.empty(mean_a.shape[0])
    for c in range(mean_a.shape[0]):
        mean[c], m2[c] = _merged_channel(count_a, mean_a[c], m2_a[c], count_b, mean_b[c], m2_b[c])
    return mean, m2


@_inline
def merge_rows(rows):
    """``(count, mean, M2)`` of rows ``[count, mean (C values), M2 (C values)]``, merged in
    row order (one row per rank or chunk: the order fixes the bits)."""
    n_channels = (rows.shape[1] - 1) // 2
    count = 0
    mean = np.zeros(n_channels)
    m2 = np.zeros(n_channels)
    for row in range(rows.shape[0]):
        count_b = np.int64(rows[row, 0])
        for c in range(n_channels):
            mean[c], m2[c] = _merged_channel(
                count, mean[c], m2[c], count_b, rows[row, 1 + c], rows[row, 1 + n_channels + c]
            )
        count += count_b
    return count, mean, m2


@_shared
def train_coefficients(mean, m2, count, weight, bias, eps, running_mean, running_var, momentum):
    """Per-channel ``(invstd, scale, shift)`` of a training normalisation.

    ``mean`` and ``m2`` (sum of squared deviations) are the batch's, over
    ``count`` values per channel. Updates ``running_mean``/``running_var`` in
    place unless they are empty: every path that normalises with batch
    statistics (one call, threads, SyncBatchNorm, Dask) goes through here.
    """
    n_channels = mean.shape[0]
    invstd = np.empty(n_channels)
    scale = np.empty(n_channels)
    shift = np.empty(n_channels)
    for c in range(n_channels):
        invstd[c], scale[c] = _scale_channel(m2[c] / count, widen(weight[c]), eps)
        shift[c] = widen(bias[c])
        if running_mean.size:
            average = _running_average(widen(running_mean[c]), mean[c], momentum)
            running_mean[c] = narrowed(average, running_mean)
            variance = _unbiased_variance(m2[c], count)
            average = _running_average(widen(running_var[c]), variance, momentum)
            running_var[c] = narrowed(average, running_var)
    return invstd, scale, shift


@_shared
def finish_forward(totals, shift, count, weight, bias, eps, running_mean, running_var, momentum):
    """Per-channel ``(mean, invstd, scale, shift)`` from the statistics sums, in one call.

    Also updates ``running_mean``/``running_var`` in place unless they are empty.
    """
    mean, m2 = moments_from_sums(totals, shift, count)
    invstd, scale, bias_shift = train_coefficients(
        mean, m2, count, weight, bias, eps, running_mean, running_var, momentum
    )
    return mean, invstd, scale, bias_shift


@_shared
def eval_coefficients(running_mean, running_var, weight, bias, eps):
    """Per-channel float64 ``(mean, invstd, scale, shift)`` of the eval-mode normalisation."""
    n_channels = running_mean.shape[0]
    mean = np.empty(n_channels)
    invstd = np.empty(n_channels)
    scale = np.empty(n_channels)
    shift = np.empty(n_channels)
    for c in range(n_channels):
        mean[c] = widen(running_mean[c])
        invstd[c], scale[c] = _scale_channel(widen(running_var[c]), widen(weight[c]), eps)
        shift[c] = widen(bias[c])
    return mean, invstd, scale, shift


@_shared
def finish_backward(totals, count, invstd, weight):
    """Per-channel ``(alpha, beta, gamma)`` of ``dx = (dy + beta * (x - mean) + gamma) * alpha``."""
    n_channels = invstd.shape[0]
    alpha = np.empty(n_channels)
    beta = np.empty(n_channels)
    gamma = np.empty(n_channels)
    for c in range(n_channels):
        alpha[c], beta[c], gamma[c] = _backward_channel(
            totals[0, c], totals[1, c], count, invstd[c], widen(weight[c])
        )
    return alpha, beta, gamma
