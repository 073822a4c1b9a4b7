"""Host-side driver of the CPU kernels: layouts, scratch, and threads."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from numbabn import _coefficients
from numbabn._cpu import fused, halves, host_arrays, jit, kernels, parallel, serial
from numbabn._cpu.jit import launch, native_address
from numbabn._cpu.parallel import run_items
from numbabn._tunables import COPY_BLOCK, PARALLEL_MIN_ELEMENTS, STAGING_ARRAYS_KEPT
from numbabn._validation import PARAM_DTYPES
from numbabn._views import Tiling, tiling_of
from numbabn.epilogue import Epilogue

_this_thread = threading.local()
# A reusable context that does nothing (small calls feel every allocation).
_NOTHING_TO_ORDER = contextlib.nullcontext()


@contextlib.contextmanager
def on_calling_thread() -> Iterator[None]:
    """Run the kernels of the calls made inside on the calling thread, never Numba's threads.

    For callers that already run many calls in parallel (Dask's tasks): each
    call then uses one core, whatever ``NUMBA_NUM_THREADS`` says, and calls of
    several threads never queue for Numba's thread pool. Results are the same
    bits either way (work items do not depend on the thread count).
    """
    previous = getattr(_this_thread, "serial", False)
    _this_thread.serial = True
    try:
        yield
    finally:
        _this_thread.serial = previous


def _staging_like(x: np.ndarray) -> np.ndarray:
    """An uninitialised array as ``np.empty_like(x)`` makes: one this thread kept, or a new one.

    A kept array is handed out again only once nothing else refers to it (a
    staged operand's view holds its base), so a call never shares one with
    another call in progress. The last :data:`STAGING_ARRAYS_KEPT` made stay kept.
    """
    key = (x.shape, x.strides, x.dtype)
    kept = _this_thread.__dict__.setdefault("staging", [])
    for kept_key, array in kept:
        # Three references when free: the list's, this loop's name, getrefcount's argument.
        if kept_key == key and sys.getrefcount(array) <= 3:
            return array
    array = np.empty_like(x)
    kept.insert(0, (key, array))
    del kept[STAGING_ARRAYS_KEPT:]
    return array


def _on_bits(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` given 16-bit float arrays as their bits (:func:`halves.as_bits`), the
    kernels' form of them, and returning its arrays of bits as those floats again."""

    @functools.wraps(method)
    def on_bits(*args: Any, **kwargs: Any) -> Any:
        # Most calls have no 16-bit operand: told by the item sizes, they go straight through
        # (a loop, not any() of a generator, which costs a call per operand).
        for array in (*args, *kwargs.values()):
            if getattr(array, "itemsize", 0) == 2:
                break
        else:
            return method(*args, **kwargs)
        result = method(
            *map(halves.as_bits, args), **{name: halves.as_bits(v) for name, v in kwargs.items()}
        )
        if isinstance(result, tuple):
            return tuple(map(halves.from_bits, result))
        return halves.from_bits(result)

    return on_bits


def _serial(n_elements: int) -> bool:
    """Whether a pass over ``n_elements`` runs in one call on the calling thread."""
    return n_elements < PARALLEL_MIN_ELEMENTS or getattr(_this_thread, "serial", False)


class _Operands:
    """``x`` in its canonical layout, plus views of further arrays shaped like it."""

    def __init__(self, x: np.ndarray) -> None:
        self.original = x
        tiling = tiling_of(x)
        if tiling is None:
            # More than three separate strided groups: the one case that copies.
            x = np.ascontiguousarray(x)
            tiling = tiling_of(x)
            assert tiling is not None  # a C-contiguous array always has one
        self.x = x
        self.tiling: Tiling = tiling
        view = tiling.view(x)
        assert view is not None  # x has its own tiling's view
        self.view = _as_input(view)
        self.serial = _serial(x.size)
        self.n_items = tiling.n_items
        # Kernels come in one compiled family per view kind: FAMILY[ops.family] picks.
        self.family = int(tiling.channels_inner)
        self.launch_args = (tiling.geometry,)
        self.elementwise_geometry = tiling.elementwise_geometry
        self.n_elementwise_items = tiling.n_elementwise_items

    def fits(self, view: np.ndarray | None) -> bool:
        """Whether ``view`` (of another array, by this tiling) streams like ``x``'s own.

        A view whose innermost axis is strided where ``x``'s is contiguous (a
        channels-last gradient for NCHW data) would read or write one element
        per cache line: such an array is staged instead.
        """
        if view is None:
            return False
        contiguous = self.view.strides[3] == self.view.itemsize
        return not contiguous or view.shape[3] == 1 or view.strides[3] == view.itemsize

    def input_view(self, array: np.ndarray) -> np.ndarray:
        """View another input, copying it into ``x``'s layout unless it fits as it is.

        A residual reaches here inside an :class:`Epilogue`, still in 16-bit floats:
        it is viewed as the kernels' bits, as ``x`` is.
        """
        array = halves.as_bits(array)
        view = self.tiling.view(array)
        if not self.fits(view):
            staged = _staging_like(self.x)
            _copy(staged, array)
            view = self.staged_view(staged)
        assert view is not None
        return _as_input(view)

    def staged_view(self, staged: np.ndarray) -> np.ndarray:
        """View ``staged``, made like ``self.x``: its strides always fit the tiling."""
        view = self.tiling.view(staged)
        assert view is not None
        return view

    def first_values(self) -> np.ndarray:
        """Each channel's first value in float64: the statistics' shift.

        The kernels and ``moments_from_sums`` take a non-finite one as 0. NumPy
        rather than a compiled function, which would cost a first call a compilation.
        """
        first = self.view[0, 0, 0, :] if self.tiling.channels_inner else self.view[0, :, 0, 0]
        return halves.widened(first)

    def partials(self) -> np.ndarray:
        return np.empty((self.tiling.n_tiles, 2, self.x.shape[1]))

    def run(self, kernel: Callable[..., None], *args: Any) -> None:
        """Run a reduction's ``*_items`` kernel over every item."""
        _run(kernel, self.n_items, self.serial, *args)

    def run_elementwise(self, kernel: Callable[..., None], *args: Any) -> None:
        """Run an elementwise ``*_items`` kernel over its items: ``args`` are its operands
        up to its geometry, then its output."""
        *operands, target = args
        geometry = self.elementwise_geometry
        _run(kernel, self.n_elementwise_items, self.serial, *operands, geometry, target)

    def normalise(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        shift: np.ndarray,
        epilogue: Epilogue | None,
        target: np.ndarray,
    ) -> None:
        """``target = (x - mean) * scale + shift``, then the epilogue's residual add and ReLU."""
        if epilogue is None:
            affine = kernels.AFFINE[self.family]
            self.run_elementwise(affine, self.view, mean, scale, shift, target)
            return
        z = self.view if epilogue.residual is None else self.input_view(epilogue.residual)
        self.run_elementwise(
            fused.AFFINE_ACT[self.family], self.view, z, mean, scale, shift,
            epilogue.residual is not None, epilogue.relu, target,
        )  # fmt: skip

    def write(self, out: np.ndarray | None, kernel: Callable[[np.ndarray], Any]) -> tuple:
        """Run ``kernel(out_view)``; return ``(out, kernel's result)``.

        ``out`` is allocated like the caller's input when None, and staged
        through such an array when its strides do not fit the layout.
        """
        target = np.empty_like(self.original) if out is None else out
        view = self.tiling.view(target)
        if view is not None and self.fits(view):
            return target, kernel(view)
        staged = _staging_like(self.x)
        result = kernel(self.staged_view(staged))
        _copy(target, staged)
        return target, result


def _as_rows(array: np.ndarray) -> np.ndarray | None:
    """``array`` of shape ``(N, C, *spatial)`` viewed as ``(N, C, 1, M)``; None if it has none."""
    shape, strides = array.shape, array.strides
    for axis in range(2, array.ndim - 1):
        if strides[axis] != shape[axis + 1] * strides[axis + 1]:
            return None
    inner = strides[-1] if array.ndim > 2 else 0
    rows = (shape[0], shape[1], 1, math.prod(shape[2:]))
    return as_strided(array, rows, (strides[0], strides[1], 0, inner))


def _copy(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` for two arrays of one shape and any layouts.

    A copy between NCHW and channels-last, whose unit strides lie on different
    axes, goes through :func:`kernels.transpose_items` in cache-sized tiles on
    Numba's threads; NumPy's own copy reads or writes such pairs one element per
    cache line. Each array is viewed in its own memory order (C-contiguous views
    for the canonical layouts, which compile to simpler indexing), and the tiles'
    inner loop walks the channels, the channels-last side's contiguous axis,
    whichever side that is: measured faster both ways than walking the positions.
    """
    source_rows, target_rows = _as_rows(source), _as_rows(target)
    if (
        source_rows is None
        or target_rows is None
        or _channels_inner(source_rows) == _channels_inner(target_rows)
    ):
        target[...] = source
        return
    target_channels_inner = _channels_inner(target_rows)
    if target_channels_inner:
        target_rows = target_rows.transpose(0, 3, 2, 1)
    else:
        source_rows = source_rows.transpose(0, 3, 2, 1)
    n_items = (
        source.shape[0]
        * -(-source_rows.shape[1] // COPY_BLOCK)
        * -(-source_rows.shape[3] // COPY_BLOCK)
    )
    _run(
        kernels.transpose_items,
        n_items,
        _serial(source.size),
        _as_input(source_rows),
        target_rows,
        COPY_BLOCK,
        target_channels_inner,
    )


def _channels_inner(rows: np.ndarray) -> bool:
    """Whether ``rows``, an ``(N, C, 1, M)`` view, steps through channels faster than positions."""
    return abs(rows.strides[1]) < abs(rows.strides[3])


def _merged(partials: np.ndarray) -> np.ndarray:
    """The ``(T, 2, C)`` partials summed over tiles in tile order: the same bits every time.

    (NumPy adds along the outer axis of a reduction one tile after another.)
    """
    return partials[0] if partials.shape[0] == 1 else np.add.reduce(partials, axis=0)


def _run(kernel: Callable[..., None], n_items: int, serial: bool, *args: Any) -> None:
    """Run an ``*_items`` kernel over ``n_items`` items: in one call, or on Numba's threads."""
    if serial:
        launch(kernel, *args, 0, n_items)
    else:
        run_items(kernel, n_items, *args)


def _grad_from_sums(
    ops: _Operands,
    dy_view: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: np.ndarray,
    sums: np.ndarray,
    count: int,
    target: np.ndarray,
) -> None:
    """Write ``dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` into ``target``."""
    coefficients = np.empty((3, invstd.shape[0]))
    launch(serial.gradient_coefficients, sums, count, invstd, weight, coefficients)
    alpha, beta, gamma = coefficients
    ops.run_elementwise(
        kernels.GRAD[ops.family], dy_view, ops.view, mean, alpha, beta, gamma, target
    )


def _as_input(view: np.ndarray) -> np.ndarray:
    """Mark ``view``, a view this module made, read-only, and return it.

    The kernels' variants type their inputs read-only (see :mod:`numbabn._cpu.jit`):
    a read-only view matches a variant exactly, where a writable one would match
    both the C-contiguous and the strided variant by a conversion, and be ambiguous.
    """
    view.flags.writeable = False
    return view


class _PlannedForward:
    """Forwards of one signature, each in one compiled call.

    Made once per signature by :meth:`CpuBackend.plan_forward`, with the call's
    parameters and running statistics: the views, the kernels' variants and their
    addresses are looked up here, and a call only views its arrays and runs
    :mod:`numbabn._cpu.serial` (``threaded``: the same passes with their items on
    Numba's threads, :func:`numbabn._cpu.parallel.train_forward` and ``eval_forward``).
    """

    def __init__(
        self,
        ops: _Operands,
        dtype: np.dtype,
        weight: np.ndarray,
        bias: np.ndarray,
        running_mean: np.ndarray | None,
        running_var: np.ndarray | None,
        training: bool,
        eps: float,
        threaded: bool,
        out: np.ndarray | None = None,
    ) -> None:
        x, tiling = ops.x, ops.tiling
        # The calls' dtype, and for 16-bit floats that of the bits the kernels take instead.
        self.dtype, self.bits = dtype, halves.bits_dtype(dtype)
        output = np.empty_like(x)
        # How to view the input and a new output: a reshape, or these strides.
        self.x_view = _view_recipe(tiling, x)
        self.out_view = _view_recipe(tiling, output)
        # The caller's out= of the planned signature (as bits): how to view it.
        self.caller_out_view = None if out is None else _view_recipe(tiling, out)
        self.view_shape = tiling.view_shape
        n_channels = x.shape[1]
        vector = np.zeros(n_channels)
        coefficients = np.zeros((4, n_channels))
        geometry, elementwise = tiling.geometry, tiling.elementwise_geometry
        affine_args = (ops.view, vector, vector, vector, elementwise, tiling.view(output), 0, 0)
        affine = _address(kernels.AFFINE[ops.family], affine_args)
        self.training = training
        # The whole passes: on Numba's threads, or on the calling thread.
        self.train_forward: Callable[..., np.ndarray] = parallel.train_forward
        self.eval_forward: Callable[..., np.ndarray] = parallel.eval_forward
        if not threaded:
            self.train_forward = functools.partial(launch, serial.train_forward)
            self.eval_forward = functools.partial(launch, serial.eval_forward)
        # The kernel's arguments before the input's view, and after it (eval: up to out).
        self.before: tuple[Any, ...]
        self.after: tuple[Any, ...]
        self.tail: tuple[Any, ...] = ()  # training: after the momentum, up to out
        if not training:
            coefficients_of = _address(
                serial.running_coefficients,
                (running_mean, running_var, weight, bias, eps, coefficients),
            )
            self.before = (coefficients_of, affine)
            self.after = (running_mean, running_var, weight, bias, eps, elementwise)
            return
        if running_mean is None or running_var is None:
            running_mean = running_var = _filled(0.0, 0, x.dtype)
        partials = np.zeros((tiling.n_tiles, 2, n_channels))
        sums_args = (ops.view, ops.view, vector, vector, True, geometry, partials, 0, 0)
        coefficients_of = _address(
            serial.batch_coefficients,
            (partials[0], vector, 1, weight, bias, eps, running_mean, running_var, 0.0,
             coefficients),
        )  # fmt: skip
        self.before = (_address(kernels.SUMS[ops.family], sums_args), coefficients_of, affine)
        self.after = (weight, bias, running_mean, running_var)
        self.tail = (eps, tiling.channels_inner, geometry, elementwise)

    def __call__(
        self, x: np.ndarray, momentum: float, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, Any, Any]:
        """``(output, mean, invstd)`` of a forward of ``x`` (into ``out``, when the plan was
        made for one), arrays of the planned signature."""
        if self.bits is not None:
            x = x.view(self.bits)
            out = None if out is None else out.view(self.bits)
        # Left writable: the whole-pass functions have one variant, which takes it as read-only.
        view = _viewed(x, self.view_shape, self.x_view)
        if out is None:
            output, out_view = _new_viewed(x, self.view_shape, self.out_view)
        else:
            assert self.caller_out_view is not None  # planned with an out= of these strides
            output, out_view = out, _viewed(out, self.view_shape, self.caller_out_view)
        if self.training:
            coefficients = self.train_forward(
                *self.before, view, *self.after, momentum, *self.tail, out_view
            )
        else:
            coefficients = self.eval_forward(*self.before, view, *self.after, out_view)
        if self.bits is not None:
            output = output.view(self.dtype)
        return output, coefficients[0], coefficients[1]


class _SerialBackward:
    """Small training backwards of one signature, each in one compiled call.

    Made once per signature by :meth:`CpuBackend.plan_backward`, with the call's
    weight (ones standing in for none): the views and the kernels' addresses are
    looked up here, and a call runs :func:`numbabn._cpu.serial.train_backward`.
    """

    def __init__(self, ops: _Operands, dtype: np.dtype, dy: np.ndarray, weight: np.ndarray) -> None:
        x, tiling = ops.x, ops.tiling
        # The calls' dtype, and for 16-bit floats that of the bits the kernels take instead.
        self.dtype, self.bits = dtype, halves.bits_dtype(dtype)
        output = np.empty_like(x)
        self.x_view = _view_recipe(tiling, x)
        self.dy_view = _view_recipe(tiling, dy)
        self.out_view = _view_recipe(tiling, output)
        self.view_shape = tiling.view_shape
        self.weight = weight
        n_channels = x.shape[1]
        vector = np.zeros(n_channels)
        geometry = tiling.geometry
        dy_view = tiling.view(dy)
        assert dy_view is not None  # plan_backward checked that it fits
        dy_view = _as_input(dy_view)
        partials = np.zeros((tiling.n_tiles, 2, n_channels))
        sums_args = (ops.view, dy_view, vector, vector, False, geometry, partials, 0, 0)
        coefficients = np.zeros((3, n_channels))
        grad_args = (dy_view, ops.view, vector, vector, vector, vector, geometry)
        self.before = (
            _address(kernels.SUMS[ops.family], sums_args),
            _address(serial.gradient_coefficients, (partials[0], 1, vector, weight, coefficients)),
            _address(kernels.GRAD[ops.family], (*grad_args, tiling.view(output), 0, 0)),
        )
        self.geometries = (geometry, tiling.elementwise_geometry)

    def __call__(
        self, dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dx, dweight, dbias)`` of a backward of arrays of the planned signature."""
        if self.bits is not None:
            dy, x = dy.view(self.bits), x.view(self.bits)
        # Left writable, as a planned forward's input view.
        x_view = _viewed(x, self.view_shape, self.x_view)
        dy_view = _viewed(dy, self.view_shape, self.dy_view)
        output, out_view = _new_viewed(x, self.view_shape, self.out_view)
        totals = launch(
            serial.train_backward, *self.before, x_view, dy_view, mean, invstd, self.weight,
            *self.geometries, out_view,
        )  # fmt: skip
        grads = _param_grads(totals[0], totals[1], invstd, self.weight.dtype)
        if self.bits is None:
            return output, *grads
        return halves.from_bits(output), *map(halves.from_bits, grads)


_Recipe = tuple[bool, tuple[int, ...] | None]


def _view_recipe(tiling: Tiling, array: np.ndarray) -> _Recipe:
    """How to view arrays of ``array``'s signature for ``tiling``: a reshape, or these strides."""
    strides = tiling.view_strides(array.shape, array.strides)
    return tiling.c_order and array.flags.c_contiguous, strides


def _viewed(array: np.ndarray, shape: tuple[int, ...], recipe: _Recipe) -> np.ndarray:
    """``array`` viewed with the ``shape`` of its tiling's view, by ``recipe``."""
    reshaped, strides = recipe
    return array.reshape(shape) if reshaped else as_strided(array, shape, strides)


def _new_viewed(x: np.ndarray, shape: tuple[int, ...], recipe: _Recipe) -> tuple[np.ndarray, Any]:
    """A new array like ``x`` (its layout kept), and its view of ``shape`` by ``recipe``."""
    reshaped, strides = recipe
    if reshaped:  # C-contiguous: allocated in the view's shape, without empty_like's dispatch
        view = np.empty(shape, x.dtype)
        return view.reshape(x.shape), view
    output = np.empty_like(x)
    return output, as_strided(output, shape, strides)


def _address(kernel: Callable[..., None], args: tuple[Any, ...]) -> int:
    """The address of ``kernel``'s variant for ``args``, compiled (or loaded) first."""
    launch(kernel, *args)
    return native_address(kernel, args)


@functools.lru_cache(maxsize=64)
def _filled(value: float, n: int, dtype: np.dtype) -> np.ndarray:
    """A shared constant vector standing in for a missing weight or bias (never written)."""
    return np.full(n, value, dtype)


class CpuBackend:
    """Batch-norm passes over host arrays of any strides; per-channel vectors are float64.

    Host arrays of any library are taken as NumPy views (:mod:`.host_arrays`).
    Besides the passes, this backend serves what lives on the host whatever the
    data's device: the merges of exchanged statistics and the kernel cache.
    """

    name = "cpu"
    param_dtypes: dict[np.dtype, np.dtype] = PARAM_DTYPES
    adopt = staticmethod(host_arrays.adopt)
    like = staticmethod(host_arrays.like)
    one_thread = staticmethod(on_calling_thread)
    merge_moments = staticmethod(kernels.merge_moments)
    merge_rows = staticmethod(kernels.merge_rows)
    empty_like = staticmethod(np.empty_like)
    filled = staticmethod(_filled)
    may_share_memory = staticmethod(np.may_share_memory)

    @staticmethod
    @_on_bits
    def eval_coefficients(
        running_mean: np.ndarray, running_var: np.ndarray, weight: np.ndarray, bias: np.ndarray,
        eps: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Per-channel float64 ``(mean, invstd, scale, shift)`` of the eval-mode normalisation."""
        coefficients = np.empty((4, running_mean.shape[0]))
        args = (running_mean, running_var, weight, bias, eps, coefficients)
        launch(serial.running_coefficients, *args)
        mean, invstd, scale, shift = coefficients
        return mean, invstd, scale, shift

    @staticmethod
    def device_for(index: int | None) -> None:
        """The device a module placed here keeps its state on: none, on the host."""
        return None

    @staticmethod
    def on_device(device: int | None) -> contextlib.AbstractContextManager[None]:
        """Nothing to make current on the host."""
        return _NOTHING_TO_ORDER

    @staticmethod
    def device_of(array: Any) -> None:
        """Host arrays are on no device."""
        return None

    @staticmethod
    def compile_counts() -> tuple[int, int]:
        """``(compiled, loaded)``: kernel signatures compiled and loaded from the cache so far.

        Summed over the backend's dispatchers in this process (Numba's cache
        misses and hits).
        """
        compiled = loaded = 0
        for dispatcher in jit.DISPATCHERS:
            stats = dispatcher.stats
            compiled += sum(stats.cache_misses.values())
            loaded += sum(stats.cache_hits.values())
        return compiled, loaded

    @staticmethod
    def cache_dir() -> str:
        """The directory where Numba caches the kernels (created if missing).

        A folder named after the digest of the sources, in ``NUMBA_CACHE_DIR`` when
        set, else in the user's cache directory.
        """
        dispatcher: Any = kernels.moments_from_sums
        path = str(dispatcher._cache.cache_path)  # Numba's FunctionCache knows its locator
        os.makedirs(path, exist_ok=True)
        return path

    @staticmethod
    def from_host(array: np.ndarray) -> np.ndarray:
        """A copy of host ``array`` (this backend's arrays are host arrays)."""
        return np.copy(array)

    @staticmethod
    def to_host(array: np.ndarray) -> np.ndarray:
        """A copy of ``array`` that the caller owns."""
        return np.copy(array)

    @staticmethod
    def assign(target: np.ndarray, values: np.ndarray | float) -> None:
        """Copy host ``values`` (or one value) into ``target``."""
        target[...] = values

    @staticmethod
    def accumulate(target: np.ndarray, source: np.ndarray) -> None:
        """``target += source`` for parameter-gradient vectors."""
        target += source

    @staticmethod
    def on_stream(
        stream: Any | None, x: np.ndarray, others: tuple[Any, ...] = ()
    ) -> contextlib.AbstractContextManager[None]:
        """Nothing to order on the CPU: a ``stream`` is refused.

        Raises
        ------
        TypeError
            For a ``stream``: streams order work on a GPU, and the arrays are host arrays.
        """
        if stream is not None:
            raise TypeError(
                "stream= orders work on a CUDA device, but the arrays are host arrays; "
                "pass CUDA arrays or leave stream out"
            )
        return _NOTHING_TO_ORDER

    @staticmethod
    @_on_bits
    def train_forward(
        x: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        running_mean: np.ndarray | None,
        running_var: np.ndarray | None,
        momentum: float,
        eps: float,
        out: np.ndarray | None,
        epilogue: Epilogue | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalise with batch statistics; return ``(output, mean, invstd)`` (float64).

        The running statistics are updated in place unless they are None. An
        ``epilogue`` adds a residual and applies a ReLU in the same pass.
        """
        if running_mean is None or running_var is None:
            running_mean = running_var = _filled(0.0, 0, x.dtype)
        ops = _Operands(x)
        partials = ops.partials()

        def kernel(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            view = ops.view
            shift = ops.first_values()
            sums = kernels.SUMS[ops.family]
            ops.run(sums, view, view, shift, shift, True, *ops.launch_args, partials)
            coefficients = np.empty((4, x.shape[1]))
            launch(
                serial.batch_coefficients, _merged(partials), shift, x.size // x.shape[1], weight,
                bias, eps, running_mean, running_var, momentum, coefficients,
            )  # fmt: skip
            mean, invstd, scale, shift = coefficients
            ops.normalise(mean, scale, shift, epilogue, target)
            return mean, invstd

        output, (mean, invstd) = ops.write(out, kernel)
        return output, mean, invstd

    @staticmethod
    def plan_forward(
        x: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        running_mean: np.ndarray | None,
        running_var: np.ndarray | None,
        training: bool,
        eps: float,
        epilogue: Epilogue | None,
        out: np.ndarray | None = None,
    ) -> _PlannedForward | None:
        """A runner of forwards of arrays of ``x``'s signature with these arguments, made
        once for them; None where the fused passes serve as well.

        Forwards with no epilogue, normalised into a new output that fits their
        layout, get one: each call is then one compiled call (:mod:`.serial` for
        the small tensors that run on the calling thread, :mod:`.parallel`'s whole
        passes for the others), with the bits of the fused passes.
        """
        if epilogue is not None or not x.size:
            return None
        dtype = x.dtype
        x, weight, bias, running_mean, running_var, out = map(
            halves.as_bits, (x, weight, bias, running_mean, running_var, out)
        )
        ops = _Operands(x)
        outputs = [np.empty_like(x)] if out is None else [out]
        if ops.x is not x or not all(ops.fits(ops.tiling.view(array)) for array in outputs):
            return None  # a copy or a staged output: the fused passes handle those
        return _PlannedForward(
            ops, dtype, weight, bias, running_mean, running_var, training, eps,
            threaded=x.size >= PARALLEL_MIN_ELEMENTS, out=out,
        )  # fmt: skip

    @staticmethod
    def plan_backward(
        dy: np.ndarray, x: np.ndarray, weight: np.ndarray, batch_stats: bool,
        epilogue: Epilogue | None,
    ) -> _SerialBackward | None:  # fmt: skip
        """A runner ``(dy, x, mean, invstd) -> (dx, dweight, dbias)`` of backwards of arrays
        of these signatures with this ``weight`` (ones for none), made once for them; None
        where the fused passes serve as well.

        Small training backwards without an epilogue whose gradient and new output fit
        the input's tiling get one, as forwards do (:meth:`plan_forward`).
        """
        if not batch_stats or epilogue is not None or not 0 < x.size < PARALLEL_MIN_ELEMENTS:
            return None
        dtype = x.dtype
        dy, x, weight = map(halves.as_bits, (dy, x, weight))
        ops = _Operands(x)
        fits = ops.fits(ops.tiling.view(dy)) and ops.fits(ops.tiling.view(np.empty_like(x)))
        if ops.x is not x or not fits:
            return None
        return _SerialBackward(ops, dtype, dy, weight)

    @staticmethod
    @_on_bits
    def eval_forward(
        x: np.ndarray,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        eps: float,
        out: np.ndarray | None,
        epilogue: Epilogue | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalise with the running statistics; return ``(output, mean, invstd)``."""
        mean, invstd, scale, shift = CpuBackend.eval_coefficients(
            running_mean, running_var, weight, bias, eps
        )
        ops = _Operands(x)

        def kernel(target: np.ndarray) -> None:
            ops.normalise(mean, scale, shift, epilogue, target)

        return ops.write(out, kernel)[0], mean, invstd

    @staticmethod
    @_on_bits
    def masked_backward(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        invstd: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        batch_stats: bool,
        epilogue: Epilogue,
        out: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Gradients through a forward that ended in a ReLU: ``(dx, dz, dweight, dbias)``.

        The ReLU mask is recomputed from ``x`` (and the residual) as the forward
        computed it; ``dz`` (the residual's gradient, ``dy`` masked) is None
        without a residual.
        """
        ops = _Operands(x)
        dy_view = ops.input_view(dy)
        residual = epilogue.residual
        z_view = ops.view if residual is None else ops.input_view(residual)
        scale, shift = invstd * halves.widened(weight), halves.widened(bias)
        grad_residual = dz_view = None
        if residual is not None:
            grad_residual = np.empty_like(x)
            dz_view = ops.tiling.view(grad_residual)
            if dz_view is None:  # x was copied into another layout
                grad_residual = np.empty_like(ops.x)
                dz_view = ops.tiling.view(grad_residual)
            assert dz_view is not None  # an array made like x or ops.x fits the tiling
            # Read back as the second pass's input, typed like the other inputs.
            dz_input = _as_input(dz_view.view())  # dz_view itself is still written
        partials = ops.partials()
        count = x.size // x.shape[1]

        def kernel(target: np.ndarray) -> np.ndarray:
            # Without a residual the first pass writes nothing; it still takes a
            # writable array for dz (x may be read-only), and dx is one.
            ops.run(
                fused.MASKED_SUMS[ops.family], dy_view, ops.view, z_view, mean, scale, shift,
                residual is not None, *ops.launch_args, partials,
                target if dz_view is None else dz_view,
            )  # fmt: skip
            totals = _merged(partials)
            if batch_stats:
                alpha, beta, gamma = kernels.finish_backward(totals, count, invstd, weight)
            else:
                alpha, beta, gamma = scale, np.zeros_like(scale), np.zeros_like(scale)
            if residual is None:
                ops.run_elementwise(
                    fused.MASKED_GRAD[ops.family], dy_view, ops.view, mean, scale, shift, alpha,
                    beta, gamma, batch_stats, target,
                )  # fmt: skip
            elif not batch_stats:
                # dx = dz * alpha: x must not enter (0 * (x - mean) is NaN for infinite x).
                ops.run_elementwise(
                    kernels.AFFINE[ops.family], dz_input, beta, alpha, gamma, target
                )
            else:
                # The first pass wrote the masked dy to dz: the plain gradient pass reads
                # it in place of dy and z (two reads and a write instead of three and two).
                ops.run_elementwise(
                    kernels.GRAD[ops.family], dz_input, ops.view, mean, alpha, beta, gamma, target
                )
            return totals

        grad_input, totals = ops.write(out, kernel)
        return grad_input, grad_residual, *_param_grads(totals[0], totals[1], invstd, weight.dtype)

    @staticmethod
    @_on_bits
    def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float64 ``(mean, M2)`` (sum of squared deviations) in one pass."""
        ops = _Operands(x)
        # Sums around each channel's first value keep data far from zero precise.
        shift = ops.first_values()
        partials = ops.partials()
        ops.run(
            kernels.SUMS[ops.family],
            ops.view,
            ops.view,
            shift,
            shift,
            True,
            *ops.launch_args,
            partials,
        )
        return kernels.moments_from_sums(_merged(partials), shift, x.size // x.shape[1])

    @staticmethod
    @_on_bits
    def train_coefficients(
        mean: np.ndarray, m2: np.ndarray, count: int, weight: np.ndarray, bias: np.ndarray,
        eps: float, running_mean: np.ndarray | None, running_var: np.ndarray | None,
        momentum: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """``(invstd, scale, shift)`` of a training normalisation with these statistics.

        Updates the running statistics in place unless they are None.
        """
        if running_mean is None or running_var is None:
            running_mean = running_var = _filled(0.0, 0, weight.dtype)
        return kernels.train_coefficients(
            mean, m2, count, weight, bias, eps, running_mean, running_var, momentum
        )

    @staticmethod
    @_on_bits
    def affine(
        x: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        shift: np.ndarray,
        out: np.ndarray | None,
        epilogue: Epilogue | None = None,
    ) -> np.ndarray:
        """``(x - mean) * scale + shift`` per channel, in float64, rounded once.

        The elementwise pass of a normalisation whose coefficients came from
        elsewhere (another rank's, or a Dask reduction's statistics); an
        ``epilogue`` adds a residual and applies a ReLU in the same pass.
        """
        ops = _Operands(x)
        return ops.write(out, lambda target: ops.normalise(mean, scale, shift, epilogue, target))[0]

    @staticmethod
    @_on_bits
    def grad_sums(dy: np.ndarray, x: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Per-channel ``[sum(dy), sum(dy * (x - mean))]``, shape ``(2, C)``, in one pass."""
        ops = _Operands(x)
        partials = ops.partials()
        dy_view = ops.input_view(dy)
        zeros = np.zeros_like(mean)
        ops.run(
            kernels.SUMS[ops.family],
            ops.view,
            dy_view,
            mean,
            zeros,
            False,
            *ops.launch_args,
            partials,
        )
        return _merged(partials)

    @staticmethod
    @_on_bits
    def grad_input_from_sums(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        invstd: np.ndarray,
        weight: np.ndarray,
        sums: np.ndarray,
        count: int,
        out: np.ndarray | None,
    ) -> np.ndarray:
        """Input gradient through batch statistics, given ``sums = [sum(dy), sum(dy*(x-mean))]``.

        ``count`` is the number of values per channel the sums cover (all ranks'
        for SyncBatchNorm).
        """
        ops = _Operands(x)
        dy_view = ops.input_view(dy)

        def kernel(target: np.ndarray) -> None:
            _grad_from_sums(ops, dy_view, mean, invstd, weight, sums, count, target)

        return ops.write(out, kernel)[0]

    @staticmethod
    @_on_bits
    def train_backward(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        invstd: np.ndarray,
        weight: np.ndarray,
        out: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gradients through batch statistics: ``(dx, dweight, dbias)``, in ``weight``'s dtype."""
        ops = _Operands(x)
        dy_view = ops.input_view(dy)
        partials = ops.partials()

        def kernel(target: np.ndarray) -> np.ndarray:
            zeros = np.zeros_like(mean)
            args = (ops.view, dy_view, mean, zeros, False, *ops.launch_args, partials)
            ops.run(kernels.SUMS[ops.family], *args)
            totals = _merged(partials)
            count = x.size // x.shape[1]
            _grad_from_sums(ops, dy_view, mean, invstd, weight, totals, count, target)
            return totals

        grad_input, totals = ops.write(out, kernel)
        return grad_input, *_param_grads(totals[0], totals[1], invstd, weight.dtype)

    @staticmethod
    @_on_bits
    def eval_backward(
        dy: np.ndarray,
        x: np.ndarray,
        mean: np.ndarray,
        invstd: np.ndarray,
        weight: np.ndarray | None,
        out: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Gradients through fixed statistics: ``dx = dy * weight * invstd``."""
        grads: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
        if weight is not None:
            # Before dx is written: out= may be dy or x.
            sum_dy, sum_dy_xmu = CpuBackend.grad_sums(dy, x, mean)
            grads = _param_grads(sum_dy, sum_dy_xmu, invstd, weight.dtype)
        zeros = np.zeros_like(mean)
        scale = invstd if weight is None else halves.widened(weight) * invstd
        return CpuBackend.affine(dy, zeros, scale, zeros, out), *grads


def _param_grads(
    sum_dy: np.ndarray, sum_dy_xmu: np.ndarray, invstd: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(dweight, dbias) = (sum(dy * xhat), sum(dy))`` in the parameters' dtype."""
    grad_weight, grad_bias = _coefficients.parameter_gradients(sum_dy, sum_dy_xmu, invstd)
    return halves.rounded(grad_weight, dtype), halves.rounded(grad_bias, dtype)
