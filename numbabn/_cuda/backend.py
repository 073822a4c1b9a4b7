"""Host-side driver of the CUDA kernels: views, grids, scratch and launches."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from numbabn._cuda import arrays, kernels
from numbabn._cuda.kernels import Family, ForwardRow, Mode
from numbabn._tunables import (
    MAX_MERGE_ROUNDS,
    MAX_PER_THREAD,
    MIN_GRID_BLOCKS,
    MIN_PER_THREAD,
    TARGET_BLOCKS,
)
from numbabn._validation import PARAM_DTYPES
from numbabn._views import tiling_for
from numbabn.epilogue import Epilogue

# A reusable context that does nothing.
_AS_IT_IS = contextlib.nullcontext()

# The grid depends on the shape and the tunables alone, so results do not depend on the GPU.


@dataclass(frozen=True)
class _Grid:
    """How one input shape and memory layout maps onto the kernels."""

    slots_view: Any  # the CPU layout whose axis groups the view follows
    shape: tuple[int, int, int, int]
    family: Family
    channels_per_block: int  # 1 for planar views
    per_block: int
    n_chunks: int
    n_groups: int
    merge_rounds: int  # dependent rounds of loads in the merge of partials (0: no merge)

    @property
    def blocks(self) -> int:
        return self.n_chunks * self.n_groups

    def view(self, array: Any) -> Any | None:
        """``array`` as the kernels' ``(A, C, R, S)`` operand; None if its strides do not fit."""
        strides = self.slots_view.view_strides(tuple(array.shape), tuple(array.strides))
        if strides is None:
            return None
        if self.family == Family.CHANNELS_INNER:
            strides = (strides[0], strides[3], 0, 0)
        return arrays.view(array, self.shape, strides)

    def partials_shape(self, n_channels: int) -> tuple[int, int, int]:
        """Partials as the kernels index them: neighbouring threads touch neighbours."""
        if self.family == Family.CHANNELS_INNER:
            return (self.n_chunks, n_channels, 2)
        return (n_channels, self.n_chunks, 2)


@functools.lru_cache(maxsize=256)
def _grid(shape: tuple[int, ...], strides: tuple[int, ...], sizes: tuple[int, ...]) -> _Grid | None:
    """The grid for an input; ``sizes`` are the tunables (part of the cache key).

    Wide rows are walked row by row (``WIDE_ROWS``, chunks of whole rows) only where
    such chunks still give at least ``min_blocks`` blocks: a few long rows, such as
    (1, 3, 2048, 2048), are cut into chunks of values instead (``ROWS``). Chunks are
    never so many that the merge of a channel's partials takes more than
    ``max_merge_rounds`` dependent rounds of loads (see ``kernels._merge_partials``).
    """
    threads, most_channels, target, min_per_thread, max_per_thread, wide_row_threads = sizes[:6]
    min_blocks, merge_loads, max_merge_rounds = sizes[6:]
    layout = tiling_for(shape, strides)
    if layout is None:
        return None
    if layout.channels_inner:
        n_values, _, _, n_channels = layout.view_shape
        view_shape = (n_values, n_channels, 1, 1)
        family = Family.CHANNELS_INNER
        # Narrow tensors: fewer channels, more positions a warp (a power of two).
        channels_per_block = min(most_channels, 1 << (n_channels - 1).bit_length())
        n_groups = -(-n_channels // channels_per_block)
    else:
        a, n_channels, r, s = layout.view_shape
        view_shape = (a, n_channels, r, s)
        family = Family.ROWS if r == 1 else Family.PLANAR
        if r == 1 and s >= wide_row_threads * threads:
            family = Family.WIDE_ROWS
        n_values = a * r * s
        channels_per_block = 1
        n_groups = n_channels
    threads_per_channel = threads // channels_per_block
    wanted = -(-n_values * n_groups // target)
    per_thread = min(max_per_thread, max(min_per_thread, -(-wanted // threads_per_channel)))
    # The last block merges a channel's partials with threads_per_channel threads, each
    # loading merge_loads at a time: at most max_merge_rounds rounds of those, so at most
    # most_chunks chunks a channel (wide rows' chunks of whole rows are no more).
    most_chunks = threads_per_channel * merge_loads * max_merge_rounds
    per_thread = max(per_thread, -(-n_values // (most_chunks * threads_per_channel)))
    per_block = per_thread * threads_per_channel
    if family == Family.WIDE_ROWS:  # whole rows a block
        whole_rows = max(1, per_block // s, -(-n_values // (most_chunks * s))) * s
        if -(-n_values // whole_rows) * n_groups >= min_blocks:
            per_block = whole_rows
        else:
            family = Family.ROWS
    n_chunks = max(1, -(-n_values // per_block))
    rounds = 0 if n_chunks == 1 else -(-n_chunks // (threads_per_channel * merge_loads))
    return _Grid(
        layout, view_shape, family, channels_per_block, per_block, n_chunks, n_groups, rounds
    )


def _grid_for(x: Any) -> _Grid | None:
    sizes = (
        kernels.THREADS, kernels.CHANNELS_PER_BLOCK, TARGET_BLOCKS, MIN_PER_THREAD, MAX_PER_THREAD,
        kernels.WIDE_ROW_THREADS, MIN_GRID_BLOCKS, kernels.MERGE_LOADS, MAX_MERGE_ROUNDS,
    )  # fmt: skip
    return _grid(tuple(x.shape), tuple(x.strides), sizes)


@dataclass(frozen=True)
class _Scratch:
    """What a reduction launch works in, reused by every launch of one shape on one stream.

    ``counters`` are zeroed before each launch (:meth:`_Operands.scratch`);
    ``coeffs`` holds the backward's coefficients between its two launches.
    """

    partials: Any
    counters: Any
    coeffs: Any


@functools.lru_cache(maxsize=64)
def _scratch(
    queue: tuple[int, ...], partials_shape: tuple[int, int, int], n_groups: int, n_channels: int
) -> _Scratch:
    """Scratch for one launch queue (:func:`arrays.queue_key`) and grid.

    Launches of one queue run one after another, so they can share it; another
    context, stream or host thread gets its own.
    """
    return _Scratch(
        arrays.empty(partials_shape, np.float64),
        arrays.to_device(np.zeros(n_groups, np.uint32)),
        _coefficients(n_channels),
    )


class _Operands:
    """``x`` viewed for the kernels, plus views of further arrays shaped like it.

    Arrays whose strides the kernels cannot use are copied through staging memory
    kept per call queue and role (:func:`arrays.kept`): a repeated call allocates
    none. Two operand sets of one call may share a role's memory, as the second's
    copies are queued after the first's launches.
    """

    def __init__(self, x: Any, as_rows: bool = False) -> None:
        grid = _grid_for(x)
        if grid is None or (as_rows and grid.family == Family.PLANAR):
            # More than three separately strided axis groups (or a planar view where
            # the caller needs rows): the cases that copy.
            staged = arrays.kept("input", tuple(x.shape), x.dtype)
            arrays.copy(x, staged)
            x = staged
            grid = _grid_for(x)
            assert grid is not None  # a freshly allocated array always has a grid
        self.x = x
        self.grid: _Grid = grid
        self.view = grid.view(x)

    def input_view(self, array: Any, role: str) -> Any:
        """View another input, copying it into ``x``'s layout if its strides differ (into
        staging memory of its ``role``)."""
        view = self.grid.view(array)
        if view is None:
            staged = arrays.kept_like(self.x, role)
            arrays.copy(array, staged)
            view = self.grid.view(staged)
        return view

    def scratch(self) -> _Scratch:
        """The scratch of this call's queue and grid, its counters zeroed on the call's stream
        (an aborted launch, or two overlapping on it, may have left them anywhere)."""
        n_channels = self.x.shape[1]
        grid = self.grid
        scratch = _scratch(
            arrays.queue_key(), grid.partials_shape(n_channels), grid.n_groups, n_channels
        )
        arrays.zero(scratch.counters)
        return scratch

    def launch(self, kernel: Any, *args: Any) -> None:
        """Run a data kernel over the grid (its channels per block and chunk size go first)."""
        grid = self.grid
        arrays.configured(kernel, grid.blocks, kernels.THREADS)(
            grid.channels_per_block, grid.per_block, *args
        )

    def target(self, out: Any) -> tuple[Any, Any, Any]:
        """``(target, its view, staged)``: ``out`` (allocated like ``x`` when None), and
        the array the kernel writes, staged when ``out``'s strides do not fit."""
        target = arrays.empty_like(self.x) if out is None else out
        view = self.grid.view(target)
        staged = None
        if view is None:
            staged = arrays.kept_like(self.x, "output")
            view = self.grid.view(staged)
        return target, view, staged

    def epilogue_views(self, x_view: Any, epilogue: Epilogue | None) -> tuple[Any, bool, bool]:
        """``(z view, residual?, relu?)`` of an epilogue (``x_view`` stands in for no z)."""
        residual = None if epilogue is None else epilogue.residual
        z_view = x_view if residual is None else self.input_view(residual, "residual")
        return z_view, residual is not None, epilogue is not None and epilogue.relu

    def elementwise(
        self,
        x_view: Any,
        dy_view: Any,
        mode: Mode,
        coeffs: Any,
        out: Any,
        epilogue: Epilogue | None = None,
    ) -> Any:
        """Run the elementwise kernel into ``out`` (allocated like ``x`` when None)."""
        target, view, staged = self.target(out)
        z_view, residual, relu = self.epilogue_views(x_view, epilogue)
        kernel = kernels.elementwise(self.grid.family, mode, residual, relu)
        self.launch(kernel, x_view, dy_view, z_view, coeffs, view)
        if staged is not None:
            arrays.copy(staged, target)
        return target


def _coefficients(n_channels: int) -> Any:
    """Per-channel float64 coefficients for the elementwise kernel (see its docstring)."""
    return arrays.empty((kernels.COEFFICIENT_ROWS, n_channels), np.float64)


def _kept_coefficients(n_channels: int) -> Any:
    """Coefficients a call uses and does not return, kept for its queue (as ``_scratch``)."""
    return arrays.kept("coefficients", (kernels.COEFFICIENT_ROWS, n_channels), np.float64)


def _per_channel(kernel: Any, n: int) -> Any:
    """``kernel`` configured with one thread per channel (at least one block)."""
    return arrays.configured(kernel, max(1, -(-n // kernels.THREADS)), kernels.THREADS)


class CudaBackend:
    """Batch-norm passes over device arrays; per-channel statistics are float64 device vectors."""

    name = "cuda"
    param_dtypes: dict[np.dtype, np.dtype] = PARAM_DTYPES
    device_of = staticmethod(arrays.device_of)
    adopt = staticmethod(arrays.adopt)
    like = staticmethod(arrays.like)
    empty_like = staticmethod(arrays.empty_like)
    filled = staticmethod(arrays.filled)
    from_host = staticmethod(arrays.to_device)
    to_host = staticmethod(arrays.to_host)
    assign = staticmethod(arrays.assign)
    may_share_memory = staticmethod(arrays.may_share_memory)
    on_stream = staticmethod(arrays.on_stream)

    @staticmethod
    def device_for(index: int | None) -> int:
        """The GPU a module placed on ``cuda:index`` keeps its state on (``cuda``: the
        current one)."""
        return arrays.current_device() if index is None else index

    @staticmethod
    def on_device(device: int | None) -> contextlib.AbstractContextManager[Any]:
        """Make GPU ``device`` current for what follows (None: leave the current one)."""
        return _AS_IT_IS if device is None else arrays.on_device(device)

    @staticmethod
    def one_thread() -> contextlib.AbstractContextManager[Any]:
        """Nothing to change: the host thread only queues the GPU's work."""
        return _AS_IT_IS

    @staticmethod
    def plan_forward(
        x: Any,
        weight: Any,
        bias: Any,
        running_mean: Any | None,
        running_var: Any | None,
        training: bool,
        eps: float,
        epilogue: Epilogue | None,
        out: Any | None = None,
    ) -> None:
        """No runner of its own: the fused passes serve every signature."""
        return None

    @staticmethod
    def plan_backward(
        dy: Any, x: Any, weight: Any, batch_stats: bool, epilogue: Epilogue | None
    ) -> None:
        """No runner of its own: the fused passes serve every signature."""
        return None

    @staticmethod
    def train_forward(
        x: Any,
        weight: Any,
        bias: Any,
        running_mean: Any | None,
        running_var: Any | None,
        momentum: float,
        eps: float,
        out: Any | None,
        epilogue: Epilogue | None = None,
    ) -> tuple[Any, Any, Any]:
        """Normalise with batch statistics; return ``(output, mean, invstd)``.

        The running statistics are updated in place unless they are None. An
        ``epilogue`` adds a residual and applies a ReLU in the same pass.
        """
        ops = _Operands(x)
        coeffs = _coefficients(x.shape[1])  # mean and invstd stay with the caller
        scratch = ops.scratch()
        update = running_mean is not None
        ops.launch(
            kernels.statistics(ops.grid.family), ops.view, weight, bias,
            running_mean if update else weight, running_var if update else weight, update,
            momentum, eps, coeffs, scratch.partials, scratch.counters,
        )  # fmt: skip
        output = ops.elementwise(ops.view, ops.view, Mode.AFFINE, coeffs, out, epilogue)
        return output, coeffs[ForwardRow.MEAN], coeffs[ForwardRow.INVSTD]

    @staticmethod
    def eval_forward(
        x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: float,
        out: Any | None, epilogue: Epilogue | None = None,
    ) -> tuple[Any, Any, Any]:  # fmt: skip
        """Normalise with the running statistics; return ``(output, mean, invstd)``.

        One launch: the kernel computes the coefficients as it goes.
        """
        ops = _Operands(x)
        coeffs = _coefficients(x.shape[1])
        target, view, staged = ops.target(out)
        z_view, residual, relu = ops.epilogue_views(ops.view, epilogue)
        ops.launch(
            kernels.evaluation(ops.grid.family, residual, relu), ops.view, z_view, running_mean,
            running_var, weight, bias, eps, coeffs, view,
        )  # fmt: skip
        if staged is not None:
            arrays.copy(staged, target)
        return target, coeffs[ForwardRow.MEAN], coeffs[ForwardRow.INVSTD]

    @staticmethod
    def _gradient_sums(
        dy: Any, x: Any, mean: Any, invstd: Any, weight: Any, bias: Any | None = None,
        epilogue: Epilogue | None = None, batch_stats: bool = True,
    ) -> tuple[_Operands, Any, Any, Any, Any]:  # fmt: skip
        """The first backward launch: ``(operands, dy view, coefficients, [dweight, dbias],
        dz)``; through a ReLU with a residual it writes the masked ``dy`` to ``dz`` (else
        None)."""
        # Through a ReLU, rebuilding the mask (and with a residual, writing dz) over the
        # strides of a planar view takes more than the 64 registers a thread that half
        # occupancy leaves. Such operands are staged as rows instead.
        ops = _Operands(x, as_rows=epilogue is not None)
        dy_view = ops.input_view(dy, "dy")
        z_view, residual, _ = ops.epilogue_views(ops.view, epilogue)
        dz = arrays.empty_like(ops.x) if residual else None
        dz_view = ops.view if dz is None else ops.grid.view(dz)
        grads = arrays.empty((2, x.shape[1]), weight.dtype)
        scratch = ops.scratch()
        ops.launch(
            kernels.gradient_sums(ops.grid.family, epilogue is not None, residual), dy_view,
            ops.view, z_view, mean, invstd, weight, weight if bias is None else bias,
            batch_stats, scratch.coeffs, grads, scratch.partials, scratch.counters, dz_view,
        )  # fmt: skip
        return ops, dy_view, scratch.coeffs, grads, dz

    @staticmethod
    def masked_backward(
        dy: Any, x: Any, mean: Any, invstd: Any, weight: Any, bias: Any, batch_stats: bool,
        epilogue: Epilogue, out: Any | None,
    ) -> tuple[Any, Any | None, Any, Any]:  # fmt: skip
        """Gradients through a forward that ended in a ReLU: ``(dx, dz, dweight, dbias)``.

        The ReLU mask is recomputed from ``x`` (and the residual) as the forward
        computed it; ``dz`` is None without a residual. With one, the first pass
        writes the masked ``dy`` to ``dz`` and the second reads it in place of
        ``dy``, the residual and the mask.
        """
        ops, dy_view, coeffs, grads, dz = CudaBackend._gradient_sums(
            dy, x, mean, invstd, weight, bias, epilogue, batch_stats
        )
        if dz is None:
            mode = Mode.MASKED_GRADIENT if batch_stats else Mode.MASKED_SCALE
            grad_input = ops.elementwise(ops.view, dy_view, mode, coeffs, out)
        else:
            mode = Mode.GRADIENT if batch_stats else Mode.SCALED_GRADIENT
            grad_input = ops.elementwise(ops.view, ops.grid.view(dz), mode, coeffs, out)
        return grad_input, dz, grads[0], grads[1]

    @staticmethod
    def train_backward(
        dy: Any, x: Any, mean: Any, invstd: Any, weight: Any, out: Any | None
    ) -> tuple[Any, Any, Any]:
        """Gradients through batch statistics: ``(dx, dweight, dbias)``, in ``weight``'s dtype."""
        ops, dy_view, coeffs, grads, _ = CudaBackend._gradient_sums(dy, x, mean, invstd, weight)
        grad_input = ops.elementwise(ops.view, dy_view, Mode.GRADIENT, coeffs, out)
        return grad_input, grads[0], grads[1]

    @staticmethod
    def eval_backward(
        dy: Any, x: Any, mean: Any, invstd: Any, weight: Any | None, out: Any | None
    ) -> tuple[Any, Any | None, Any | None]:
        """Gradients through fixed statistics: ``dx = dy * weight * invstd``."""
        n_channels = x.shape[1]
        scale_weight = arrays.filled(1.0, n_channels, np.dtype(np.float32))
        grads = (None, None)
        if weight is not None:
            scale_weight = weight
            _, _, _, param_grads, _ = CudaBackend._gradient_sums(
                dy, x, mean, invstd, weight, batch_stats=False
            )
            grads = (param_grads[0], param_grads[1])
        coeffs = _kept_coefficients(n_channels)
        _per_channel(kernels.gradient_scale, n_channels)(invstd, scale_weight, coeffs)
        ops = _Operands(dy)
        grad_input = ops.elementwise(ops.view, ops.view, Mode.AFFINE, coeffs, out)
        return grad_input, *grads

    # -- the phases, for callers that exchange statistics between them ---------
    # Per-channel statistics in and out are float64 NumPy vectors (what crosses
    # an exchange); parameters and running statistics are device arrays.

    @staticmethod
    def moments(x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, M2)`` (sum of squared deviations) in one pass."""
        ops = _Operands(x)
        scratch = ops.scratch()
        ones = arrays.filled(1.0, x.shape[1], np.dtype(np.float64))
        ops.launch(
            kernels.statistics(ops.grid.family), ops.view, ones, ones, ones, ones, False, 0.0,
            0.0, scratch.coeffs, scratch.partials, scratch.counters,
        )  # fmt: skip
        coeffs = scratch.coeffs
        host = arrays.to_host(coeffs)
        return host[ForwardRow.MEAN], host[ForwardRow.M2]

    @staticmethod
    def train_coefficients(
        mean: np.ndarray, m2: np.ndarray, count: int, weight: Any, bias: Any, eps: float,
        running_mean: Any | None, running_var: Any | None, momentum: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """``(invstd, scale, shift)`` of a training normalisation with these statistics.

        Updates the running statistics in place unless they are None.
        """
        n_channels = mean.shape[0]
        coeffs = _kept_coefficients(n_channels)
        update = running_mean is not None and running_var is not None
        _per_channel(kernels.batch_coefficients, n_channels)(
            arrays.upload(mean, 0), arrays.upload(m2, 1), count, weight, bias, eps,
            running_mean if update else weight, running_var if update else weight, update,
            momentum, coeffs,
        )  # fmt: skip
        host = arrays.to_host(coeffs)
        return host[ForwardRow.INVSTD], host[ForwardRow.SCALE], host[ForwardRow.SHIFT]

    @staticmethod
    def eval_coefficients(
        running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, invstd, scale, shift)`` of the eval-mode normalisation."""
        coeffs = _kept_coefficients(running_mean.shape[0])
        _per_channel(kernels.running_coefficients, running_mean.shape[0])(
            running_mean, running_var, weight, bias, eps, coeffs
        )
        host = arrays.to_host(coeffs)
        return (
            host[ForwardRow.MEAN],
            host[ForwardRow.INVSTD],
            host[ForwardRow.SCALE],
            host[ForwardRow.SHIFT],
        )

    @staticmethod
    def affine(
        x: Any, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: Any | None,
        epilogue: Epilogue | None = None,
    ) -> Any:  # fmt: skip
        """``(x - mean) * scale + shift`` per channel, then the epilogue, in float64."""
        host = np.zeros((kernels.COEFFICIENT_ROWS, mean.shape[0]))
        host[ForwardRow.MEAN], host[ForwardRow.SCALE], host[ForwardRow.SHIFT] = mean, scale, shift
        ops = _Operands(x)
        return ops.elementwise(
            ops.view, ops.view, Mode.AFFINE, arrays.upload(host, 0), out, epilogue
        )

    @staticmethod
    def grad_sums(dy: Any, x: Any, mean: np.ndarray) -> np.ndarray:
        """Per-channel ``[sum(dy), sum(dy * (x - mean))]``, shape ``(2, C)``, in one pass."""
        ones = arrays.filled(1.0, x.shape[1], np.dtype(np.float64))
        _, _, _, grads, _ = CudaBackend._gradient_sums(dy, x, arrays.upload(mean, 0), ones, ones)
        sum_dy_xmu, sum_dy = arrays.to_host(grads)  # grads = [sum * invstd, sum], invstd = 1
        return np.stack([sum_dy, sum_dy_xmu])

    @staticmethod
    def grad_input_from_sums(
        dy: Any, x: Any, mean: np.ndarray, invstd: np.ndarray, weight: Any, sums: np.ndarray,
        count: int, out: Any | None,
    ) -> Any:  # fmt: skip
        """Input gradient through batch statistics whose sums cover ``count`` values."""
        ops = _Operands(x)
        dy_view = ops.input_view(dy, "dy")
        coeffs = _kept_coefficients(x.shape[1])
        _per_channel(kernels.gradient_coefficients, x.shape[1])(
            arrays.upload(np.asarray(sums, np.float64), 0), count, arrays.upload(mean, 1),
            arrays.upload(invstd, 2), weight, coeffs,
        )  # fmt: skip
        return ops.elementwise(ops.view, dy_view, Mode.GRADIENT, coeffs, out)

    @staticmethod
    def accumulate(target: Any, source: Any) -> None:
        """``target += source`` for parameter-gradient vectors."""
        _per_channel(kernels.accumulate, target.shape[0])(target, source)
