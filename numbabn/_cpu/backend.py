"""Host-side driver of the CPU kernels: layouts, scratch, serial or parallel launch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

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


def _launch(pair: tuple[Callable, Callable], n_elements: int, *args: Any) -> Any:
    parallel, serial = pair
    if n_elements < PARALLEL_MIN_ELEMENTS or numba.get_num_threads() == 1:
        return serial(*args)
    with _parallel_launch:
        return parallel(*args)


class _Operands:
    """``x`` in its canonical layout, plus views of further arrays shaped like it."""

    def __init__(self, x: np.ndarray) -> None:
        layout = plan(x)
        if layout is None:
            # More than three separate strided groups: the one case that copies.
            x = np.ascontiguousarray(x)
            layout = plan(x)
        self.x = x
        self.layout: Layout = layout
        self.view = layout.view(x)
        self.launch_args = (layout.channels_inner, layout.geometry)

    def input_view(self, array: np.ndarray) -> np.ndarray:
        """View another input, copying it into ``x``'s layout if its strides differ."""
        view = self.layout.view(array)
        if view is None:
            staged = np.empty_like(self.x)
            staged[...] = array
            view = self.layout.view(staged)
        return view

    def partials(self) -> np.ndarray:
        return np.empty((self.layout.n_tiles, 2, self.x.shape[1]))

    def write(self, out: np.ndarray | None, kernel: Callable[[np.ndarray], Any]) -> tuple:
        """Run ``kernel(out_view)``; return ``(out, kernel's result)``.

        ``out`` is allocated like ``x`` when None, and staged through such an
        array when its strides do not fit the layout.
        """
        target = np.empty_like(self.x) if out is None else out
        view = self.layout.view(target)
        if view is not None:
            return target, kernel(view)
        staged = np.empty_like(self.x)
        result = kernel(self.layout.view(staged))
        target[...] = staged
        return target, result


class CpuBackend:
    """Batch-norm passes over NumPy arrays of any strides; per-channel vectors are float64."""

    name = "cpu"

    @staticmethod
    def train_forward(
        x: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        momentum: float,
        eps: float,
        out: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalise with batch statistics; return ``(output, mean, invstd)`` (float64).

        The running statistics are updated in place unless they are empty arrays.
        """
        ops = _Operands(x)
        partials = ops.partials()

        def kernel(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _launch(
                kernels.train_forward, x.size, ops.view, weight, bias, running_mean,
                running_var, momentum, eps, *ops.launch_args, partials, target,
            )  # fmt: skip

        output, (mean, invstd) = ops.write(out, kernel)
        return output, mean, invstd

    @staticmethod
    def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float64 ``(mean, M2)`` (sum of squared deviations) in one pass."""
        ops = _Operands(x)
        # Sums around each channel's first value keep data far from zero precise.
        shift = ops.view[0, :, 0, 0].astype(np.float64)
        totals = _launch(
            kernels.sums, x.size, ops.view, ops.view, shift, shift, *ops.launch_args,
            ops.partials(),
        )  # fmt: skip
        count = x.size // x.shape[1]
        mean = shift + totals[0] / count
        m2 = np.maximum(totals[1] - totals[0] * totals[0] / count, 0.0)
        return mean, m2

    @staticmethod
    def affine(
        x: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        shift: np.ndarray,
        out: np.ndarray | None,
    ) -> np.ndarray:
        """``(x - mean) * scale + shift`` per channel, in float64, rounded once."""
        ops = _Operands(x)

        def kernel(target: np.ndarray) -> None:
            _launch(kernels.affine, x.size, ops.view, mean, scale, shift, *ops.launch_args, target)

        return ops.write(out, kernel)[0]

    @staticmethod
    def grad_sums(dy: np.ndarray, x: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass."""
        ops = _Operands(x)
        totals = _launch(
            kernels.sums, x.size, ops.view, ops.input_view(dy), mean, np.zeros_like(mean),
            *ops.launch_args, ops.partials(),
        )  # fmt: skip
        return totals[0], totals[1]

    @staticmethod
    def grad_input(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        alpha: np.ndarray,
        beta: np.ndarray,
        gamma: np.ndarray,
        out: np.ndarray | None,
    ) -> np.ndarray:
        """``alpha * dy + beta * (x - mean) + gamma`` per channel, in float64."""
        ops = _Operands(x)
        dy_view = ops.input_view(dy)

        def kernel(target: np.ndarray) -> None:
            _launch(
                kernels.grad_input, x.size, dy_view, ops.view, mean, alpha, beta, gamma,
                *ops.launch_args, target,
            )  # fmt: skip

        return ops.write(out, kernel)[0]

    @staticmethod
    def train_backward(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        invstd: np.ndarray,
        weight: np.ndarray,
        out: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Input gradient through batch statistics; return ``(dx, sum(dy), sum(dy*(x-mean)))``."""
        ops = _Operands(x)
        dy_view = ops.input_view(dy)
        partials = ops.partials()

        def kernel(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _launch(
                kernels.train_backward, x.size, dy_view, ops.view, mean, invstd, weight,
                *ops.launch_args, partials, target,
            )  # fmt: skip

        grad_input, (sum_dy, sum_dy_xmu) = ops.write(out, kernel)
        return grad_input, sum_dy, sum_dy_xmu
