"""Host-side driver of the CPU kernels: layouts, scratch, serial or parallel launch."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numba
import numpy as np

from numbabn._cpu import kernels
from numbabn._cpu.layout import Layout, plan

# Below this many elements a serial kernel beats entering a parallel region.
PARALLEL_MIN_ELEMENTS = 1 << 16

# Numba's default threading layer (workqueue) aborts when two Python threads
# enter parallel regions at once; parallel launches are serialised instead.
# They use every core already, so little is lost.
_parallel_launch = threading.Lock()


def _launch(pair: tuple[Callable, Callable], n_elements: int, *args) -> None:
    parallel, serial = pair
    if n_elements < PARALLEL_MIN_ELEMENTS or numba.get_num_threads() == 1:
        serial(*args)
        return
    with _parallel_launch:
        parallel(*args)


def _prepare(x: np.ndarray) -> tuple[np.ndarray, Layout, np.ndarray]:
    """Return ``x`` (copied only if no view exists), its layout and its canonical view."""
    layout = plan(x)
    if layout is None:
        x = np.ascontiguousarray(x)
        layout = plan(x)
    return x, layout, layout.view(x)


def _operand_view(layout: Layout, like: np.ndarray, array: np.ndarray) -> np.ndarray:
    """View a second input in ``layout``, copying it into ``like``'s layout if needed."""
    view = layout.view(array)
    if view is None:
        staged = np.empty_like(like)
        staged[...] = array
        view = layout.view(staged)
    return view


def _write_elementwise(
    layout: Layout, like: np.ndarray, out: np.ndarray | None, write: Callable[[np.ndarray], None]
) -> np.ndarray:
    """Run ``write`` on the canonical view of ``out`` (allocated like ``like`` if None)."""
    target = np.empty_like(like) if out is None else out
    view = layout.view(target)
    if view is not None:
        write(view)
        return target
    staged = np.empty_like(like)
    write(layout.view(staged))
    target[...] = staged
    return target


def _pick(layout: Layout, planar: tuple, channels_inner: tuple) -> tuple:
    return channels_inner if layout.channels_inner else planar


def _channel_sums(
    layout: Layout, u: np.ndarray, v: np.ndarray, u_shift: np.ndarray, v_shift: np.ndarray
) -> np.ndarray:
    """Per channel ``[sum(v - kv), sum((v - kv) * (u - ku))]`` as a ``(C, 2)`` float64 array."""
    n_channels = u_shift.shape[0]
    if layout.channels_inner:
        partials = np.empty((layout.n_tiles, 2, n_channels))
        _launch(kernels.channels_inner_sums, u.size, u, v, u_shift, v_shift, *layout.geometry, partials)
        # Summed in a fixed order: the result does not depend on the thread count.
        return partials.sum(axis=0).T
    partials = np.empty((n_channels, layout.n_tiles, 2))
    _launch(kernels.planar_sums, u.size, u, v, u_shift, v_shift, *layout.geometry, partials)
    return partials.sum(axis=1)


class CpuBackend:
    """Batch-norm passes over NumPy arrays of any strides."""

    name = "cpu"

    @staticmethod
    def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and biased variance (float64) in one pass over ``x``."""
        x, layout, view = _prepare(x)
        first = view[0] if layout.channels_inner else view[0, :, 0, 0]
        # Sums are taken around each channel's first element, so data whose mean
        # is far from zero keeps its precision.
        shift = first.astype(np.float64)
        sums = _channel_sums(layout, view, view, shift, shift)
        count = x.size // x.shape[1]
        mean = shift + sums[:, 0] / count
        m2 = np.maximum(sums[:, 1] - sums[:, 0] * sums[:, 0] / count, 0.0)
        return mean, m2 / count

    @staticmethod
    def affine(
        x: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        shift: np.ndarray,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(x - mean) * scale + shift`` per channel, in float64, rounded once."""
        x, layout, view = _prepare(x)
        pair = _pick(layout, kernels.planar_affine, kernels.channels_inner_affine)

        def write(target: np.ndarray) -> None:
            _launch(pair, x.size, view, mean, scale, shift, *layout.geometry, target)

        return _write_elementwise(layout, x, out, write)

    @staticmethod
    def grad_sums(dy: np.ndarray, x: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass."""
        x, layout, x_view = _prepare(x)
        dy_view = _operand_view(layout, x, dy)
        sums = _channel_sums(layout, x_view, dy_view, mean, np.zeros_like(mean))
        return sums[:, 0], sums[:, 1]

    @staticmethod
    def grad_input(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        alpha: np.ndarray,
        beta: np.ndarray,
        gamma: np.ndarray,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """``alpha * dy + beta * (x - mean) + gamma`` per channel, in float64."""
        x, layout, x_view = _prepare(x)
        dy_view = _operand_view(layout, x, dy)
        pair = _pick(layout, kernels.planar_grad, kernels.channels_inner_grad)

        def write(target: np.ndarray) -> None:
            _launch(pair, x.size, dy_view, x_view, mean, alpha, beta, gamma, *layout.geometry, target)

        return _write_elementwise(layout, x, out, write)
