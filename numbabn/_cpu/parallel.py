"""Spread a kernel's work items over Numba's threads.

Every kind of ``*_items`` kernel has a driver here: a ``parallel=True`` function
whose ``prange`` over the items calls the kernel on one item at a time. Items
are independent and each is always computed by the same compiled code, so
results do not depend on the thread count.

Which compiled code is "the same" needs care: a driver that called its kernel
by name would link a copy of the kernel's code and optimise it a second time,
which can vectorise a float64 reduction in another order (and costs most of the
driver's compile time). So a driver takes the address of the kernel's own
compiled variant (:func:`numbabn._cpu.jit.native_address`) and calls it through
that pointer: a direct call of the kernel over all items, the driver's threads,
a fresh compilation and a cache load all run the same instructions. A driver
depends only on its kernel's argument types, so one serves both families of a
kernel (planar and channels-inner), and it is compiled in its strided variant
only, which calls the kernel's C-contiguous and strided variants alike
(:func:`numbabn._cpu.jit.launch`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import prange
from numba._dispatcher import compute_fingerprint

from numbabn._cpu import fused, kernels, serial
from numbabn._cpu.jit import call_native, launch, native_address
from numbabn._cpu.jit import driver as _driver

_MEAN, _SCALE, _SHIFT = serial.Row.MEAN.value, serial.Row.SCALE.value, serial.Row.SHIFT.value

# ``geometry`` is rebuilt inside each loop: parallel regions take no tuples as inputs.
# ``prange`` counts unsigned; the kernels are compiled for int64 bounds.


@_driver
def _sums(n_items, kernel, u, v, u_shift, v_shift, squares, geometry, partials):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(kernel, (u, v, u_shift, v_shift, squares, tiling, partials, item, item + 1))


@_driver
def _affine(n_items, kernel, x, mean, scale, shift, geometry, out):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(kernel, (x, mean, scale, shift, tiling, out, item, item + 1))


@_driver
def _grad(n_items, kernel, dy, x, mean, alpha, beta, gamma, geometry, out):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(kernel, (dy, x, mean, alpha, beta, gamma, tiling, out, item, item + 1))


@_driver
def _affine_act(n_items, kernel, x, z, mean, scale, shift, residual, relu, geometry, out):
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(kernel, (x, z, mean, scale, shift, residual, relu, tiling, out, item, item + 1))


@_driver
def _masked_sums(
    n_items, kernel, dy, x, z, mean, scale, shift, residual, geometry, partials, dz
):  # fmt: skip
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(
            kernel,
            (dy, x, z, mean, scale, shift, residual, tiling, partials, dz, item, item + 1),
        )


@_driver
def _masked_grad(
    n_items, kernel, dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, geometry, dx
):  # fmt: skip
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(
            kernel,
            (dy, x, mean, scale, shift, alpha, beta, gamma, batch_stats, tiling, dx, item,
             item + 1),
        )  # fmt: skip


@_driver
def _train_forward(
    sums, coefficients_of, affine, x, weight, bias, running_mean, running_var, momentum, eps,
    channels_inner, geometry, elementwise, out,
):  # fmt: skip
    """:func:`numbabn._cpu.serial.train_forward` with both passes' items on the threads."""
    n_channels = x.shape[3] if channels_inner else x.shape[1]
    n_items = serial.work_items(n_channels, geometry)
    shift = serial.first_values(x, channels_inner, n_channels)
    partials = np.empty((geometry[3], 2, n_channels))
    g0, g1, g2, g3 = geometry
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(sums, (x, x, shift, shift, True, tiling, partials, item, item + 1))
    coefficients = serial.coefficients_from_partials(
        coefficients_of, partials, shift, x.size // n_channels, weight, bias, eps, running_mean,
        running_var, momentum,
    )  # fmt: skip
    mean, scale, bias_shift = coefficients[_MEAN], coefficients[_SCALE], coefficients[_SHIFT]
    e0, e1, e2, e3 = elementwise
    for index in prange(serial.work_items(n_channels, elementwise)):
        item = np.int64(index)
        tiling = (e0, e1, e2, e3)
        call_native(affine, (x, mean, scale, bias_shift, tiling, out, item, item + 1))
    return coefficients


@_driver
def _eval_forward(
    coefficients_of, affine, x, running_mean, running_var, weight, bias, eps, elementwise, out
):  # fmt: skip
    """:func:`numbabn._cpu.serial.eval_forward` with the elementwise items on the threads."""
    n_channels = running_mean.shape[0]
    n_items = serial.work_items(n_channels, elementwise)
    coefficients = np.empty((4, n_channels))
    call_native(coefficients_of, (running_mean, running_var, weight, bias, eps, coefficients))
    mean, scale, shift = coefficients[_MEAN], coefficients[_SCALE], coefficients[_SHIFT]
    g0, g1, g2, g3 = elementwise
    for index in prange(n_items):
        item = np.int64(index)
        tiling = (g0, g1, g2, g3)
        call_native(affine, (x, mean, scale, shift, tiling, out, item, item + 1))
    return coefficients


@_driver
def _transpose(n_items, kernel, src, dst, block, inner_on_dst):
    for index in prange(n_items):
        item = np.int64(index)
        call_native(kernel, (src, dst, block, inner_on_dst, item, item + 1))


_DRIVERS: dict[Callable[..., None], Callable[..., None]] = {
    kernel: driver
    for family, driver in (
        (kernels.SUMS, _sums),
        (kernels.AFFINE, _affine),
        (kernels.GRAD, _grad),
        ((kernels.transpose_items,), _transpose),
        (fused.AFFINE_ACT, _affine_act),
        (fused.MASKED_SUMS, _masked_sums),
        (fused.MASKED_GRAD, _masked_grad),
    )
    for kernel in family
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


def train_forward(*args: Any) -> np.ndarray:
    """:func:`numbabn._cpu.serial.train_forward` (same arguments, same bits) on Numba's threads."""
    return _run_whole(_train_forward, serial.train_forward, args)


def eval_forward(*args: Any) -> np.ndarray:
    """:func:`numbabn._cpu.serial.eval_forward` (same arguments, same bits) on Numba's threads."""
    return _run_whole(_eval_forward, serial.eval_forward, args)


def _run_whole(driver: Any, serial_pass: Any, args: tuple[Any, ...]) -> np.ndarray:
    """A whole pass by its ``driver`` on the threads, or by ``serial_pass`` where a forked
    child cannot start them."""
    global _launched
    if _serial_only:
        return launch(serial_pass, *args)
    with _launch_lock:
        coefficients = launch(driver, *args)
        _launched = True
    return coefficients


# The address of each kernel variant a driver has called, by the kernel and the
# Numba type fingerprints of its arguments (which fix the variant): the lookup
# then costs about a microsecond, where compiling the key of
# :func:`~numbabn._cpu.jit.native_address` and a call of the kernel on no items cost 8.
_addresses: dict[tuple, int] = {}


def run_items(kernel: Callable[..., None], n_items: int, *args: Any) -> None:
    """Run ``kernel(*args, start, stop)`` over items ``0`` to ``n_items`` on Numba's threads."""
    global _launched
    if _serial_only:
        launch(kernel, *args, 0, n_items)
        return
    key = (kernel, *map(compute_fingerprint, args))
    address = _addresses.get(key)
    if address is None:
        launch(kernel, *args, 0, 0)  # compiles (or loads) the variant the driver is to call
        address = _addresses[key] = native_address(kernel, args + (0, 0))
    with _launch_lock:
        launch(_DRIVERS[kernel], n_items, address, *args)
        _launched = True
