"""Batch normalization of Dask arrays: exact statistics and a lazy normalisation.

Batch norm in training is four phases: per-chunk sums, a merge in a fixed
order, per-channel coefficients, an elementwise pass. Here the chunks are the
Dask array's blocks: each block's moments come from the CPU backend (one pass,
the same kernel as in-memory calls), a tree of :meth:`ChannelStats.merge`
calls combines them, and the elementwise pass is a ``map_blocks`` over the
same backend's kernel.

The tree's shape depends only on the chunk grid: blocks are merged in the
order of their block indices, in groups of ``split_every``. So the same data
in the same chunks gives the same bits on any scheduler and any number of
workers or threads.

Each task runs its kernel on its own thread, never on Numba's thread pool:
Dask's workers and threads are the parallelism, so a cluster of single-threaded
worker processes uses one core per worker whatever ``NUMBA_NUM_THREADS`` is.

Dask itself is imported only by this module (install ``dask[array]``).

Examples
--------
>>> import dask.array as da                                     # doctest: +SKIP
>>> x = da.random.random((256, 64, 32, 32), chunks=(16, 32, 32, 32)).astype("f4")
>>> stats = channel_stats(x)                                    # exact, one pass
>>> y = batch_norm(x, running_mean, running_var, training=True)  # lazy, same chunks
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from numbabn import _phases
from numbabn import _validation as check
from numbabn._dispatch import Backend, host_backend
from numbabn._tunables import SPLIT_EVERY
from numbabn.epilogue import Epilogue, epilogue_for
from numbabn.functional import check_forward_args
from numbabn.stats import ChannelStats

try:
    import dask
    import dask.array as da
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "numbabn.dask needs Dask's arrays: pip install 'dask[array]' (numbabn's [dask] extra)"
    ) from error

__all__ = ["batch_norm", "channel_stats"]


def channel_stats(
    x: da.Array, axis: int = 1, *, split_every: int = SPLIT_EVERY, **compute_kwargs: Any
) -> ChannelStats:
    """Exact per-channel count, mean and M2 of a Dask array, in one pass over the data.

    Parameters
    ----------
    x : dask.array.Array
        float32 or float64, at least 2-D, chunked along any axes (the channel
        axis included).
    axis : int
        The channel axis (1 for ``(N, C, *spatial)``; -1 for channels-last).
    split_every : int
        How many partial results one merge task takes.
    **compute_kwargs
        Passed to ``dask.compute`` (``scheduler=...``); by default the current
        scheduler (a ``distributed.Client`` when one is active) runs it.

    Returns
    -------
    ChannelStats
        Ready to merge with others or to give to :func:`numbabn.set_running_stats`.
    """
    _check_array(x)
    axis = _channel_axis(x, axis)
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    # One row of blocks per channel chunk, the other block indices in C order.
    blocks = np.moveaxis(x.to_delayed(), axis, 0)
    blocks = blocks.reshape(blocks.shape[0], -1)
    block_moments = dask.delayed(_block_moments, pure=True)
    merge = dask.delayed(_merged, pure=True)
    per_chunk = []
    for row, width in zip(blocks, x.chunks[axis], strict=True):
        level = [block_moments(block, axis, width) for block in row]
        while len(level) > 1:
            level = [
                merge(width, *level[start : start + split_every])
                for start in range(0, len(level), split_every)
            ]
        per_chunk.append(level[0])
    (parts,) = dask.compute(per_chunk, **compute_kwargs)
    return _concatenated(parts)


def batch_norm(
    x: da.Array,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
) -> da.Array:
    """:func:`numbabn.functional.batch_norm` of a Dask array: a lazy array of the same chunks.

    In evaluation the result is one ``map_blocks`` with the running
    statistics. In training, the batch statistics are computed now (one pass
    over the data, see :func:`channel_stats`), the running statistics are
    updated in place as the in-memory function updates them, and the
    normalisation is returned lazily.

    Parameters
    ----------
    x : dask.array.Array
        Shape ``(N, C, *spatial)``, float32 or float64, any chunks.
    running_mean, running_var, weight, bias, training, momentum, eps, activation
        As :func:`numbabn.functional.batch_norm`; the per-channel arrays are NumPy arrays.

    Raises
    ------
    ValueError, RuntimeError, TypeError
        The errors :func:`numbabn.functional.batch_norm` raises for these arguments, before
        any computation; nothing is modified then.
    """
    _check_array(x)
    # The checks of an in-memory call, on a stand-in with x's shape and dtype and no data.
    stand_in = np.broadcast_to(np.zeros((), x.dtype), x.shape)
    _, arrays = check_forward_args(
        stand_in, running_mean, running_var, weight, bias, None, training, momentum, eps,
        check_batch=True,
    )  # fmt: skip
    _, running_mean, running_var, weight, bias, _ = arrays
    epilogue = epilogue_for(None, activation)
    check.check_running_writeable(training, running_mean, running_var)
    if x.size == 0:
        return x.copy()
    backend = host_backend()
    affine = _phases.with_defaults(
        backend, _phases.Affine(weight, bias), x.shape[1], backend.param_dtypes[x.dtype]
    )
    running = _phases.Running(running_mean, running_var, float(momentum))
    output, _ = _phases.forward(
        backend, x, running, affine, training, float(eps), None, epilogue, _BLOCKS
    )
    return output


class _BlockExchange:
    """The exchange of a Dask array's blocks: statistics by a tree of merges, the elementwise
    pass as a lazy ``map_blocks`` (see :class:`numbabn._phases.Exchange`)."""

    def statistics(self, backend: Backend, x: da.Array) -> ChannelStats:
        return channel_stats(x)

    def normalise(
        self, backend: Backend, x: da.Array, mean: np.ndarray, scale: np.ndarray,
        shift: np.ndarray, out: None, epilogue: Epilogue | None,
    ) -> da.Array:  # fmt: skip
        coefficients = np.stack([mean, scale, shift])
        starts = np.cumsum((0, *x.chunks[1]))
        normalise = functools.partial(
            _normalised_block, coefficients=coefficients, starts=starts, epilogue=epilogue
        )
        return da.map_blocks(normalise, x, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))


_BLOCKS = _BlockExchange()


def _check_array(x: Any) -> None:
    if not isinstance(x, da.Array):
        raise TypeError(f"expected a dask.array.Array, got {type(x).__module__}.{type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
    if any(np.isnan(size) for sizes in x.chunks for size in sizes):
        raise ValueError("the array's chunk sizes are unknown; call x.compute_chunk_sizes() first")
    check.check_dtype(np.empty(0, x.dtype))


def _channel_axis(x: da.Array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for a {x.ndim}-D array")
    return axis % x.ndim


def _block_moments(block: np.ndarray, axis: int, n_channels: int) -> ChannelStats:
    """One block's statistics: the channel axis moved to 1 (a view, never a copy)."""
    with host_backend().one_thread():
        return ChannelStats(n_channels).update(np.moveaxis(block, axis, 1))


def _merged(n_channels: int, *parts: ChannelStats) -> ChannelStats:
    """The parts merged in the order given, into a new object (the parts stay as they are)."""
    total = ChannelStats(n_channels)
    for part in parts:
        total.merge(part)
    return total


def _concatenated(parts: list[ChannelStats]) -> ChannelStats:
    """Statistics of consecutive channel ranges as one object (all cover the same count)."""
    total = ChannelStats(sum(part.num_features for part in parts))
    total.count = parts[0].count
    total.mean = np.concatenate([part.mean for part in parts])
    total.m2 = np.concatenate([part.m2 for part in parts])
    return total


def _normalised_block(
    block: np.ndarray,
    coefficients: np.ndarray,
    starts: np.ndarray,
    epilogue: Epilogue | None,
    block_id: tuple[int, ...] = (),
) -> np.ndarray:
    """``(block - mean) * scale + shift`` with this block's channels' coefficients."""
    channels = slice(starts[block_id[1]], starts[block_id[1] + 1])
    mean, scale, shift = coefficients[:, channels]
    backend = host_backend()
    with backend.one_thread():
        return backend.affine(block, mean, scale, shift, None, epilogue)
