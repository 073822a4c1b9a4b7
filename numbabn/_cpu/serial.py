"""A whole small forward or backward in one compiled call, with the bits of the separate calls.

A tensor below ``PARALLEL_MIN_ELEMENTS`` is normalised on the calling thread,
where each kernel called from Python costs more in argument handling than the
work itself. :func:`train_forward`, :func:`eval_forward` and :func:`train_backward`
run every phase of a pass in one call from Python. Each phase runs the very code the separate
calls run (:func:`~numbabn._cpu.jit.call_native`, given the addresses the caller
looked up): the statistics kernel, the per-channel coefficients below, and the
elementwise kernel. Code inlined into another function can round differently
(LLVM contracts to FMA by context), so the coefficients are compiled functions
of their own, which the separate calls run from Python too.
"""

from __future__ import annotations

import enum

import numpy as np

from numbabn._cpu import kernels
from numbabn._cpu.halves import widen
from numbabn._cpu.jit import call_native
from numbabn._cpu.jit import inline as _inline
from numbabn._cpu.jit import kernel as _kernel


class Row(enum.IntEnum):
    """The rows of a forward's ``(4, C)`` float64 coefficients."""

    MEAN = 0
    INVSTD = 1
    SCALE = 2
    SHIFT = 3


_MEAN, _INVSTD, _SCALE, _SHIFT = Row.MEAN.value, Row.INVSTD.value, Row.SCALE.value, Row.SHIFT.value


@_inline
def work_items(n_channels, geometry):
    """Work items of a tiling: channel blocks times tiles (``Tiling.n_items``)."""
    channel_block, _, _, n_tiles = geometry
    return np.int64((n_channels + channel_block - 1) // channel_block * n_tiles)


@_inline
def _merged(partials):
    """The tiles' ``(T, 2, C)`` partials summed in tile order, as the separate calls sum them."""
    totals = partials[0].copy()
    for tile in range(1, partials.shape[0]):
        for row in range(2):
            for c in range(partials.shape[2]):
                totals[row, c] += partials[tile, row, c]
    return totals


@_inline
def first_values(x, channels_inner, n_channels):
    """Each channel's first value in float64: the shift the statistics' sums are taken around."""
    shift = np.empty(n_channels)
    for c in range(n_channels):
        shift[c] = widen(x[0, 0, 0, c] if channels_inner else x[0, c, 0, 0])
    return shift


@_inline
def coefficients_from_partials(
    coefficients_of, partials, shift, count, weight, bias, eps, running_mean, running_var,
    momentum,
):  # fmt: skip
    """A training forward's :class:`Row` s from the tiles' partial sums, by the address of
    :func:`batch_coefficients`' variant (which also updates the running statistics)."""
    totals = _merged(partials)
    coefficients = np.empty((4, partials.shape[2]))
    call_native(
        coefficients_of,
        (totals, shift, np.int64(count), weight, bias, eps, running_mean, running_var, momentum,
         coefficients),
    )  # fmt: skip
    return coefficients


@_kernel
def batch_coefficients(
    totals, shift, count, weight, bias, eps, running_mean, running_var, momentum, coefficients
):  # fmt: skip
    """Write a training forward's :class:`Row` s from the statistics sums into ``coefficients``.

    Also updates ``running_mean``/``running_var`` in place unless they are empty.
    """
    mean, invstd, scale, bias_shift = kernels.finish_forward(
        totals, shift, count, weight, bias, eps, running_mean, running_var, momentum
    )
    coefficients[_MEAN] = mean
    coefficients[_INVSTD] = invstd
    coefficients[_SCALE] = scale
    coefficients[_SHIFT] = bias_shift


@_kernel
def running_coefficients(running_mean, running_var, weight, bias, eps, coefficients):
    """Write an eval forward's :class:`Row` s from the running statistics into ``coefficients``."""
    mean, invstd, scale, shift = kernels.eval_coefficients(
        running_mean, running_var, weight, bias, eps
    )
    coefficients[_MEAN] = mean
    coefficients[_INVSTD] = invstd
    coefficients[_SCALE] = scale
    coefficients[_SHIFT] = shift


@_kernel
def train_forward(
    sums, coefficients_of, affine, x, weight, bias, running_mean, running_var, momentum, eps,
    channels_inner, geometry, elementwise, out,
):  # fmt: skip
    """Normalise ``x`` with its own statistics into ``out``; return the coefficients.

    ``sums``, ``coefficients_of`` and ``affine`` are the addresses of the
    statistics kernel's, :func:`batch_coefficients`' and the elementwise
    kernel's variants for these operands; ``geometry`` is the statistics' tiling
    and ``elementwise`` the elementwise pass's (``Tiling.elementwise_geometry``).
    """
    n_channels = x.shape[3] if channels_inner else x.shape[1]
    start = np.int64(0)
    n_items = work_items(n_channels, geometry)
    shift = first_values(x, channels_inner, n_channels)
    partials = np.empty((geometry[3], 2, n_channels))
    squares = True
    call_native(sums, (x, x, shift, shift, squares, geometry, partials, start, n_items))
    coefficients = coefficients_from_partials(
        coefficients_of, partials, shift, x.size // n_channels, weight, bias, eps, running_mean,
        running_var, momentum,
    )  # fmt: skip
    mean, scale, bias_shift = coefficients[_MEAN], coefficients[_SCALE], coefficients[_SHIFT]
    n_items = work_items(n_channels, elementwise)
    call_native(affine, (x, mean, scale, bias_shift, elementwise, out, start, n_items))
    return coefficients


@_kernel
def eval_forward(
    coefficients_of, affine, x, running_mean, running_var, weight, bias, eps, elementwise, out
):  # fmt: skip
    """Normalise ``x`` with the running statistics into ``out``; return the coefficients.

    ``coefficients_of`` is the address of :func:`running_coefficients`' variant;
    ``elementwise`` is the elementwise pass's tiling.
    """
    n_channels = running_mean.shape[0]
    start = np.int64(0)
    n_items = work_items(n_channels, elementwise)
    coefficients = np.empty((4, n_channels))
    call_native(coefficients_of, (running_mean, running_var, weight, bias, eps, coefficients))
    mean, scale, shift = coefficients[_MEAN], coefficients[_SCALE], coefficients[_SHIFT]
    call_native(affine, (x, mean, scale, shift, elementwise, out, start, n_items))
    return coefficients


@_kernel
def gradient_coefficients(totals, count, invstd, weight, coefficients):
    """Write the backward's ``(alpha, beta, gamma)`` of ``dx = (dy + beta * (x - mean) + gamma)
    * alpha`` from the gradient sums into the rows of ``coefficients``."""
    alpha, beta, gamma = kernels.finish_backward(totals, count, invstd, weight)
    coefficients[0] = alpha
    coefficients[1] = beta
    coefficients[2] = gamma


@_kernel
def train_backward(
    sums, coefficients_of, grad, x, dy, mean, invstd, weight, geometry, elementwise, out
):  # fmt: skip
    """Write the input gradient through batch statistics into ``out``; return the gradient
    sums ``[sum(dy), sum(dy * (x - mean))]``.

    ``sums``, ``coefficients_of`` and ``grad`` are the addresses of the statistics
    kernel's, :func:`gradient_coefficients`' and the gradient kernel's variants;
    ``geometry`` and ``elementwise`` the tilings as in :func:`train_forward`.
    """
    n_channels = mean.shape[0]
    start = np.int64(0)
    n_items = work_items(n_channels, geometry)
    zeros = np.zeros(n_channels)
    partials = np.empty((geometry[3], 2, n_channels))
    squares = False
    call_native(sums, (x, dy, mean, zeros, squares, geometry, partials, start, n_items))
    totals = _merged(partials)
    count = np.int64(x.size // n_channels)
    coefficients = np.empty((3, n_channels))
    call_native(coefficients_of, (totals, count, invstd, weight, coefficients))
    alpha, beta, gamma = coefficients[0], coefficients[1], coefficients[2]
    n_items = work_items(n_channels, elementwise)
    call_native(grad, (dy, x, mean, alpha, beta, gamma, elementwise, out, start, n_items))
    return totals
