"""Arrays of a given logical shape in every memory layout the kernels treat differently.

The warm-up (:mod:`numbabn.warmup`) compiles a kernel variant for each, and the
tests build their inputs with them: channels-last views, slices, reversed axes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["LAYOUTS_ANY", "LAYOUTS_SPATIAL", "layouts_for", "make_layout"]

# ``make(shape)``: a new C-contiguous array of that shape.
Maker = Callable[[tuple[int, ...]], np.ndarray]

# Every memory layout :func:`make_layout` builds: any rank, then those with spatial axes.
LAYOUTS_ANY = ("contiguous", "fortran", "batch_slice", "channel_slice", "negative")
LAYOUTS_SPATIAL = (
    "channels_last",
    "inner_slice",
    "crop",
    "channels_last_slice",
    "channels_last_negative",
    "channels_last_strided",
)


def layouts_for(ndim: int) -> tuple[str, ...]:
    """Names of the layouts :func:`make_layout` can build for arrays of ``ndim`` axes."""
    return LAYOUTS_ANY + (LAYOUTS_SPATIAL if ndim >= 3 else ())


def _channels_last_order(ndim: int) -> tuple[int, ...]:
    # Logical axes (N, C, *spatial) stored in memory as (N, *spatial, C).
    return (0, *range(2, ndim), 1)


def _channels_last(make: Maker, shape: tuple[int, ...]) -> np.ndarray:
    order = _channels_last_order(len(shape))
    base = make(tuple(shape[axis] for axis in order))
    # base has axes (N, *spatial, C); put them back in logical order.
    return base.transpose(np.argsort(order))


def make_layout(make: Maker, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Build an array of logical ``shape`` in the memory ``layout`` named.

    ``make(shape)`` must return a new C-contiguous array of that shape; the
    result is a view into (or copy of) one such array, never a copy made by
    NumPy behind our back, so the strides are exactly the ones named.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if layout == "contiguous":
        x = make(shape)
    elif layout == "fortran":
        x = np.asfortranarray(make(shape))
    elif layout == "batch_slice":  # x[::2]
        x = make((2 * shape[0], *shape[1:]))[::2]
    elif layout == "channel_slice":  # x[:, ::2]
        x = make((shape[0], 2 * shape[1], *shape[2:]))[:, ::2]
    elif layout == "negative":  # every axis reversed
        x = make(shape)[(slice(None, None, -1),) * ndim]
    elif layout == "channels_last":  # transpose of a contiguous (N, *spatial, C) array
        x = _channels_last(make, shape)
    elif layout == "inner_slice":  # x[:, :, ::2] (and every other spatial axis)
        big = (shape[0], shape[1], *(2 * s for s in shape[2:]))
        x = make(big)[(slice(None), slice(None)) + (slice(None, None, 2),) * (ndim - 2)]
    elif layout == "crop":  # x[..., 1:-1, 1:-1]
        n_crop = min(2, ndim - 2)
        big = shape[: ndim - n_crop] + tuple(s + 2 for s in shape[ndim - n_crop :])
        x = make(big)[(Ellipsis,) + (slice(1, -1),) * n_crop]
    elif layout == "channels_last_slice":  # channels-last view, sliced along H
        big = (shape[0], shape[1], 2 * shape[2], *shape[3:])
        x = _channels_last(make, big)[:, :, ::2]
    elif layout == "channels_last_negative":  # channels-last view, reversed along N and H
        x = _channels_last(make, shape)[::-1, :, ::-1]
    elif layout == "channels_last_strided":  # channels-last view, every non-channel axis ::2
        big = (2 * shape[0], shape[1], *(2 * s for s in shape[2:]))
        x = _channels_last(make, big)[
            (slice(None, None, 2), slice(None)) + (slice(None, None, 2),) * (ndim - 2)
        ]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert x.shape == shape, (layout, x.shape, shape)
    return x
