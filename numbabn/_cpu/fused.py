"""CPU kernels for batch norm fused with a residual add and a ReLU.

Forward: ``out = relu((x - mean) * scale + shift + z)`` in one elementwise pass
(``z`` and the ReLU each optional). Backward never stores the output: the ReLU
mask is recomputed from ``x`` (and ``z``) with exactly the forward's float64
arithmetic, so ``g = dy * mask`` is what the plain backward then sees. With a
residual, the first backward pass also writes ``g`` as ``z``'s gradient, and the
second pass is the plain gradient kernel reading it in place of ``dy``. Work
items and views are those of :mod:`numbabn._cpu.kernels`; inner loops run over
row slices and select rather than branch, so that LLVM vectorises them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numbabn._cpu.halves import narrowed, widen, zero_bound
from numbabn._cpu.jit import inline as _inline
from numbabn._cpu.jit import kernel as _kernel
from numbabn._cpu.kernels import (
    _bounds,
    _row,
    _store_partials,
)


@_inline
def _pre_activation(x, z, m, k, b, residual):
    """The value before the ReLU, in float64, exactly as the forward computes it."""
    value = (widen(x) - m) * k + b
    if residual:
        value += widen(z)
    return value


@_inline
def _masked(dy, value):
    """``dy`` unless the pre-activation, rounded to ``dy``'s type, is 0 or below.

    PyTorch's ReLU backward zeroes the gradient where its output is 0 or below,
    and its output is the rounded pre-activation. A NaN passes ``dy`` on, as there.
    """
    return 0.0 if value <= zero_bound(dy) else widen(dy)


@_inline
def _relu(value, out):
    """``value`` clamped below at 0 as PyTorch's ReLU does on it rounded for ``out``.

    A negative value that rounds to zero stays, to be stored as -0; NaN stays NaN
    (written out rather than left to max()).
    """
    return 0.0 if value < -zero_bound(out) else value


@_inline
def _affine_act_channels_inner(x_row, z_row, m, k, b, residual, relu, out_row):
    """One row of adjacent channels (channels-inner): per-element coefficients."""
    for i in range(x_row.shape[0]):
        value = _pre_activation(x_row[i], z_row[i], m[i], k[i], b[i], residual)
        out_row[i] = narrowed(_relu(value, out_row) if relu else value, out_row)


@_inline
def _affine_act_run(x_row, z_row, m, k, b, residual, relu, out_row):
    """A run of one channel (planar): scalar coefficients."""
    for i in range(x_row.shape[0]):
        value = _pre_activation(x_row[i], z_row[i], m, k, b, residual)
        out_row[i] = narrowed(_relu(value, out_row) if relu else value, out_row)


@_inline
def _affine_act_channels_inner_item(x, z, mean, scale, shift, residual, relu, bounds, out):
    """``out = relu((x - mean) * scale + shift + z)`` over a channels-inner item."""
    _, c0, c1, row0, row1, _, _ = bounds
    m, k, b = mean[c0:c1], scale[c0:c1], shift[c0:c1]
    for p in range(row0, row1):
        _affine_act_channels_inner(
            x[p, 0, 0, c0:c1], z[p, 0, 0, c0:c1], m, k, b, residual, relu, out[p, 0, 0, c0:c1]
        )


@_inline
def _affine_act_planar_item(x, z, mean, scale, shift, residual, relu, bounds, out):
    """:func:`_affine_act_channels_inner_item` over a planar item."""
    _, c0, c1, row0, row1, s0, s1 = bounds
    n_r = x.shape[2]
    whole = s1 - s0 == x.shape[3]
    a = row0 // n_r
    r = row0 - a * n_r
    for _ in range(row0, row1):
        for c in range(c0, c1):
            _affine_act_run(
                _row(x, a, c, r, s0, s1, whole), _row(z, a, c, r, s0, s1, whole), mean[c],
                scale[c], shift[c], residual, relu, _row(out, a, c, r, s0, s1, whole),
            )  # fmt: skip
        r += 1
        if r == n_r:
            r = 0
            a += 1


@_inline
def _masked_sums_channels_inner(dy, x, z, mean, scale, shift, residual, bounds, partials, dz):
    """Channels-inner item's ``sum(g)``, ``sum(g * (x - mean))``; ``g`` to ``dz`` if residual."""
    tile, c0, c1, row0, row1, _, _ = bounds
    m, k, b = mean[c0:c1], scale[c0:c1], shift[c0:c1]
    sum_g = np.zeros(c1 - c0)
    sum_gx = np.zeros(c1 - c0)
    for p in range(row0, row1):
        dy_row, x_row, z_row = dy[p, 0, 0, c0:c1], x[p, 0, 0, c0:c1], z[p, 0, 0, c0:c1]
        dz_row = dz[p, 0, 0, c0:c1]
        for i in range(c1 - c0):
            pre = _pre_activation(x_row[i], z_row[i], m[i], k[i], b[i], residual)
            g = _masked(dy_row[i], pre)
            sum_g[i] += g
            sum_gx[i] += g * (widen(x_row[i]) - m[i])
            if residual:
                dz_row[i] = narrowed(g, dz_row)
    _store_partials(partials, tile, c0, sum_g, sum_gx)


@_inline
def _masked_sums_planar(dy, x, z, mean, scale, shift, residual, bounds, partials, dz):
    """:func:`_masked_sums_channels_inner` over a planar item."""
    tile, c0, c1, row0, row1, s0, s1 = bounds
    n_r = x.shape[2]
    for c in range(c0, c1):
        m, k, b = mean[c], scale[c], shift[c]
        acc_g = 0.0
        acc_gx = 0.0
        a = row0 // n_r
        r = row0 - a * n_r
        for _ in range(row0, row1):
            dy_row, x_row, z_row = dy[a, c, r, s0:s1], x[a, c, r, s0:s1], z[a, c, r, s0:s1]
            dz_row = dz[a, c, r, s0:s1]
            row_g = 0.0  # each row from zero, as in kernels._sums_planar
            row_gx = 0.0
            for i in range(x_row.shape[0]):
                g = _masked(dy_row[i], _pre_activation(x_row[i], z_row[i], m, k, b, residual))
                row_g += g
                row_gx += g * (widen(x_row[i]) - m)
                if residual:
                    dz_row[i] = narrowed(g, dz_row)
            acc_g += row_g
            acc_gx += row_gx
            r += 1
            if r == n_r:
                r = 0
                a += 1
        partials[tile, 0, c] = acc_g
        partials[tile, 1, c] = acc_gx


@_inline
def _masked_grad_channels_inner(
    dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, bounds, dx
):
    """``dx = (g + beta * (x - mean) + gamma) * alpha`` over a channels-inner item.

    Without ``batch_stats`` (fixed statistics) ``dx = g * alpha``: ``x`` enters
    only the mask, so an infinite ``x`` does not make ``0 * inf``.
    """
    _, c0, c1, row0, row1, _, _ = bounds
    m, k, b = mean[c0:c1], scale[c0:c1], shift[c0:c1]
    ka, kb, kg = alpha[c0:c1], beta[c0:c1], gamma[c0:c1]
    for p in range(row0, row1):
        dy_row, x_row, dx_row = dy[p, 0, 0, c0:c1], x[p, 0, 0, c0:c1], dx[p, 0, 0, c0:c1]
        for i in range(c1 - c0):
            pre = _pre_activation(x_row[i], x_row[i], m[i], k[i], b[i], False)
            g = _masked(dy_row[i], pre)
            if batch_stats:
                g += kb[i] * (widen(x_row[i]) - m[i]) + kg[i]
            dx_row[i] = narrowed(g * ka[i], dx_row)


@_inline
def _masked_grad_planar(dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, bounds, dx):
    """:func:`_masked_grad_channels_inner` over a planar item."""
    _, c0, c1, row0, row1, s0, s1 = bounds
    n_r = x.shape[2]
    whole = s1 - s0 == x.shape[3]
    a = row0 // n_r
    r = row0 - a * n_r
    for _ in range(row0, row1):
        for c in range(c0, c1):
            m, k, b = mean[c], scale[c], shift[c]
            ka, kb, kg = alpha[c], beta[c], gamma[c]
            dy_row = _row(dy, a, c, r, s0, s1, whole)
            x_row = _row(x, a, c, r, s0, s1, whole)
            dx_row = _row(dx, a, c, r, s0, s1, whole)
            for i in range(x_row.shape[0]):
                g = _masked(dy_row[i], _pre_activation(x_row[i], x_row[i], m, k, b, False))
                if batch_stats:
                    g += kb * (widen(x_row[i]) - m) + kg
                dx_row[i] = narrowed(g * ka, dx_row)
        r += 1
        if r == n_r:
            r = 0
            a += 1


# As in numbabn._cpu.kernels: one compiled kernel per family of views, the
# family a constant of the closure; the tuples are indexed by ``numbabn._views.Family``.


def _affine_act_kernel(channels_inner: bool) -> Any:
    @_kernel
    def affine_act_items(x, z, mean, scale, shift, residual, relu, geometry, out, start, stop):
        """Items ``start`` to ``stop`` of ``out = relu((x - mean) * scale + shift + z)``."""
        for item in range(start, stop):
            bounds = _bounds(item, x.shape, channels_inner, geometry)
            if channels_inner:
                _affine_act_channels_inner_item(
                    x, z, mean, scale, shift, residual, relu, bounds, out
                )
            else:
                _affine_act_planar_item(x, z, mean, scale, shift, residual, relu, bounds, out)

    return affine_act_items


def _masked_sums_kernel(channels_inner: bool) -> Any:
    @_kernel
    def masked_sums_items(
        dy, x, z, mean, scale, shift, residual, geometry, partials, dz, start, stop
    ):  # fmt: skip
        """Items' ``sum(g)`` and ``sum(g * (x - mean))`` with ``g = dy * (pre-activation > 0)``.

        With a residual, ``g`` is also the residual's gradient: it is written to
        ``dz``, and the second pass reads it in place of ``dy`` and ``z``.
        """
        for item in range(start, stop):
            bounds = _bounds(item, x.shape, channels_inner, geometry)
            if channels_inner:
                _masked_sums_channels_inner(
                    dy, x, z, mean, scale, shift, residual, bounds, partials, dz
                )
            else:
                _masked_sums_planar(dy, x, z, mean, scale, shift, residual, bounds, partials, dz)

    return masked_sums_items


def _masked_grad_kernel(channels_inner: bool) -> Any:
    @_kernel
    def masked_grad_items(
        dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, geometry, dx, start, stop
    ):  # fmt: skip
        """Items of ``dx = (g + beta * (x - mean) + gamma) * alpha`` through a ReLU, no residual."""
        for item in range(start, stop):
            bounds = _bounds(item, x.shape, channels_inner, geometry)
            if channels_inner:
                _masked_grad_channels_inner(
                    dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, bounds, dx
                )
            else:
                _masked_grad_planar(
                    dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, bounds, dx
                )

    return masked_grad_items


# Module globals, so that the drivers of numbabn._cpu.parallel can call them by name.
affine_act_planar, affine_act_channels_inner = _affine_act_kernel(False), _affine_act_kernel(True)
masked_sums_planar, masked_sums_channels_inner = (
    _masked_sums_kernel(False),
    _masked_sums_kernel(True),
)
masked_grad_planar, masked_grad_channels_inner = (
    _masked_grad_kernel(False),
    _masked_grad_kernel(True),
)
AFFINE_ACT = (affine_act_planar, affine_act_channels_inner)
MASKED_SUMS = (masked_sums_planar, masked_sums_channels_inner)
MASKED_GRAD = (masked_grad_planar, masked_grad_channels_inner)
