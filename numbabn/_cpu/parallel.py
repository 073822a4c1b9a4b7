"""Spread a kernel's work items over Numba's threads.

Every ``*_items`` kernel has a driver here: a ``parallel=True`` function whose
``prange`` over the items calls the kernel on one item at a time. Items are
independent and each is always computed by the same compiled code, so results
do not depend on the thread count.

Which compiled code is "the same" needs care. A driver calls its kernel through
a symbol, and Numba binds that symbol to whichever compiled copy of the kernel
was loaded first in the process: the kernel's own, or the copy inside the
driver's cached object code, which was optimised a second time and can
vectorise a float64 reduction in another order. So :func:`run_items` first calls
the kernel itself on an empty range, which loads the kernel's own code before
the driver can: then a fresh compilation and a cache load run the same
instructions, and so does a direct call of the kernel over all items.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import prange

from numbabn._cpu import fused, kernels
from numbabn._cpu.jit import driver as _driver
from numbabn._cpu.jit import launch


@_driver
def _sums(n_items, u, v, u_shift, v_shift, squares, channels_inner, geometry, partials):
    g0, g1, g2, g3 = geometry  # parallel regions take no tuples: rebuilt per item
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        kernels.sums_items(
            u, v, u_shift, v_shift, squares, channels_inner, (g0, g1, g2, g3), partials,
            item, item + 1,
        )  # fmt: skip


@_driver
def _affine(n_items, x, mean, scale, shift, channels_inner, geometry, out):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        kernels.affine_items(
            x, mean, scale, shift, channels_inner, (g0, g1, g2, g3), out, item, item + 1
        )


@_driver
def _grad(n_items, dy, x, mean, alpha, beta, gamma, channels_inner, geometry, out):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        kernels.grad_items(
            dy, x, mean, alpha, beta, gamma, channels_inner, (g0, g1, g2, g3), out,
            item, item + 1,
        )  # fmt: skip


@_driver
def _affine_act(n_items, x, z, mean, scale, shift, residual, relu, channels_inner, geometry, out):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        fused.affine_act_items(
            x, z, mean, scale, shift, residual, relu, channels_inner, (g0, g1, g2, g3), out,
            item, item + 1,
        )  # fmt: skip


@_driver
def _masked_sums(
    n_items, dy, x, z, mean, scale, shift, residual, channels_inner, geometry, partials, dz
):  # fmt: skip
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        fused.masked_sums_items(
            dy, x, z, mean, scale, shift, residual, channels_inner, (g0, g1, g2, g3), partials,
            dz, item, item + 1,
        )  # fmt: skip


@_driver
def _masked_grad(
    n_items, dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, channels_inner,
    geometry, dx,
):  # fmt: skip
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        fused.masked_grad_items(
            dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, channels_inner,
            (g0, g1, g2, g3), dx, item, item + 1,
        )  # fmt: skip


@_driver
def _copy(n_items, src, dst, block):
    for index in prange(n_items):
        item = np.int64(index)  # prange counts unsigned; the kernel is loaded for int64
        kernels.copy_items(src, dst, block, item, item + 1)


_DRIVERS: dict[Callable[..., None], Callable[..., None]] = {
    kernels.sums_items: _sums,
    kernels.affine_items: _affine,
    kernels.grad_items: _grad,
    kernels.copy_items: _copy,
    fused.affine_act_items: _affine_act,
    fused.masked_sums_items: _masked_sums,
    fused.masked_grad_items: _masked_grad,
}

# Numba's "workqueue" threading layer must not be entered by two threads at once.
_launch_lock = threading.Lock()
_launched = False
_serial_only = False


def _after_fork_in_child() -> None:
    global _launch_lock, _serial_only
    _launch_lock = threading.Lock()  # another thread may have held it at the fork
    # GNU OpenMP cannot run parallel regions in a child forked after it started.
    if _launched and numba.threading_layer() == "omp":
        _serial_only = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def run_items(kernel: Callable[..., None], n_items: int, *args: Any) -> None:
    """Run ``kernel(*args, start, stop)`` over items ``0`` to ``n_items`` on Numba's threads."""
    global _launched
    launch(kernel, *args, 0, 0)  # loads the kernel's own code first: see the module docstring
    if _serial_only:
        launch(kernel, *args, 0, n_items)
        return
    with _launch_lock:
        launch(_DRIVERS[kernel], n_items, *args)
        _launched = True
