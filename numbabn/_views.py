"""Canonical strided views of batch-norm operands, without copying.

An input of shape ``(N, C, *spatial)`` and any strides is viewed either as
``(P, 1, 1, C)`` when the channel axis is the innermost one in memory and every other
axis merges into one (channels-last data, ``(N, C)`` matrices), or as
``(A, C, R, S)`` with the non-channel axes merged, in memory order, into at most
three groups. The kernels of both backends work on those views (the CUDA ones
as ``(P, C, 1, 1)`` for the channels-inner case); the work items' sizes are in
:mod:`numbabn._tunables`.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from numbabn._tunables import (
    ELEMENTWISE_RUN_ELEMENTS,
    LANE_ELEMENTS,
    MIN_POSITIONS,
    RUN_ELEMENTS,
    TILE_ELEMENTS,
)

_CHANNEL: tuple[int, ...] = (1,)
_PAD: tuple[int, ...] = ()


class Family(enum.IntEnum):
    """The two kinds of canonical view; each kernel is compiled once per family, and a
    kernel tuple (``kernels.SUMS``, ...) is indexed by it."""

    PLANAR = 0  # (A, C, R, S)
    CHANNELS_INNER = 1  # (P, 1, 1, C)


@dataclass(frozen=True)
class Tiling:
    """How to view arrays shaped like one input as a kernel operand, and cut it into work
    items.

    Attributes
    ----------
    channels_inner : bool
        True for the ``(P, 1, 1, C)`` view, False for ``(A, C, R, S)``.
    channel_block : int
        Channels per work item (all of them for the channels-inner view).
    slots : tuple of tuple of int
        For each axis of the view, the input axes merged into it, outermost in
        memory first (``(1,)`` is the channel axis, ``()`` a padding axis).
    view_shape : tuple of int
        Shape of the canonical view.
    row_block : int
        Rows (planar) or positions (channels-inner) per tile.
    s_chunk : int
        Elements of the innermost axis per tile (planar only).
    n_tiles : int
        Row tiles times ``S`` chunks.
    lane_rows : int
        Adjacent positions the channels-inner elementwise kernels take as one row of lanes
        (at least ``LANE_ELEMENTS`` of them); 1 for the planar view.
    c_order : bool
        Whether the view lists the axes that matter in logical order, so that a
        C-contiguous array reaches it with a plain reshape.
    """

    channels_inner: bool
    channel_block: int
    slots: tuple[tuple[int, ...], ...]
    view_shape: tuple[int, ...]
    row_block: int
    s_chunk: int
    n_tiles: int
    lane_rows: int = 1
    c_order: bool = False

    def __post_init__(self) -> None:
        in_view = [axis for axes in self.slots for axis in axes]
        object.__setattr__(self, "c_order", in_view == sorted(in_view))

    @property
    def family(self) -> Family:
        """The family of kernels that take this view."""
        return Family.CHANNELS_INNER if self.channels_inner else Family.PLANAR

    @property
    def n_items(self) -> int:
        """Work items: channel blocks times tiles."""
        return self._n_items(self.geometry)

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """The tiling the kernels take: ``(channel_block, row_block, s_chunk, n_tiles)``.

        ``lane_rows`` stands in the place of ``s_chunk`` for the channels-inner
        view, which has no ``S`` axis to chunk.
        """
        third = self.lane_rows if self.channels_inner else self.s_chunk
        return (self.channel_block, self.row_block, third, self.n_tiles)

    @functools.cached_property
    def elementwise_geometry(self) -> tuple[int, int, int, int]:
        """The tiling the elementwise kernels take, which keep no per-tile partials.

        A planar view with one row per ``(a, c)`` holds each row's channels next to
        each other: its items there take whole channels (whole rows, for short
        ones) until they cover about ``ELEMENTWISE_RUN_ELEMENTS`` adjacent elements,
        a row's channels cut into blocks of equal size (so that the threads' shares
        of the items are too). Any other view keeps :attr:`geometry`, whose runs are
        that long already or cannot be.
        """
        a, n_channels, r, s = self.view_shape
        if self.channels_inner or r != 1 or self.s_chunk < s:
            return self.geometry
        n_blocks = max(1, n_channels * s // ELEMENTWISE_RUN_ELEMENTS)
        row_block = 1
        if n_blocks == 1:
            row_block = max(1, ELEMENTWISE_RUN_ELEMENTS // (n_channels * s))
        return (-(-n_channels // n_blocks), row_block, s, -(-a // row_block))

    @functools.cached_property
    def n_elementwise_items(self) -> int:
        """Work items of :attr:`elementwise_geometry`."""
        return self._n_items(self.elementwise_geometry)

    def _n_items(self, geometry: tuple[int, int, int, int]) -> int:
        """Work items of ``geometry``: channel blocks times tiles (``serial.work_items``)."""
        channel_block, _, _, n_tiles = geometry
        n_channels = self.view_shape[3] if self.channels_inner else self.view_shape[1]
        return -(-n_channels // channel_block) * n_tiles

    def view(self, array: np.ndarray) -> np.ndarray | None:
        """Return ``array`` viewed in this layout, or None if its strides do not allow it."""
        if self.c_order and array.flags.c_contiguous:
            return array.reshape(self.view_shape)
        strides = self.view_strides(array.shape, array.strides)
        return None if strides is None else as_strided(array, self.view_shape, strides)

    def view_strides(
        self, shape: tuple[int, ...], strides: tuple[int, ...]
    ) -> tuple[int, ...] | None:
        """Strides of the view of an array of ``shape`` and ``strides``; None if it has none."""
        merged = []
        for axes in self.slots:
            for outer, inner in zip(axes[:-1], axes[1:], strict=True):
                if strides[outer] != shape[inner] * strides[inner]:
                    return None
            merged.append(strides[axes[-1]] if axes else 0)
        return tuple(merged)


def tiling_of(x: np.ndarray) -> Tiling | None:
    """Choose the canonical layout for ``x``; None when no copy-free view exists."""
    return tiling_for(x.shape, x.strides)


@functools.lru_cache(maxsize=256)
def tiling_for(shape: tuple[int, ...], strides: tuple[int, ...]) -> Tiling | None:
    """Choose the canonical layout for an array of ``shape`` and byte ``strides``."""
    n_channels = shape[1]
    axes = [axis for axis in range(len(shape)) if axis != 1 and shape[axis] != 1]
    axes.sort(key=lambda axis: -abs(strides[axis]))
    groups: list[tuple[int, ...]] = []
    for axis in axes:
        if groups and strides[groups[-1][-1]] == shape[axis] * strides[axis]:
            groups[-1] += (axis,)
        else:
            groups.append((axis,))
    channel_stride = abs(strides[1])
    if n_channels > 1 and len(groups) <= 1 and all(channel_stride < abs(strides[a]) for a in axes):
        n_pos = math.prod(shape[axis] for axis in axes)
        # Whole rows: a block of a row's channels would read runs shorter than a
        # row, and an elementwise pass then ran at half speed from C = 1024 on.
        row_block = max(MIN_POSITIONS, TILE_ELEMENTS // n_channels)
        slots = (groups[0] if groups else _PAD, _PAD, _PAD, _CHANNEL)
        n_tiles = -(-n_pos // row_block)
        view_shape = (n_pos, 1, 1, n_channels)
        lane_rows = -(-LANE_ELEMENTS // n_channels)
        return Tiling(True, n_channels, slots, view_shape, row_block, 1, n_tiles, lane_rows)
    if len(groups) > 3:
        return None
    # Place the groups as (A, R, S): the innermost group is always S.
    placement = {0: (None, None, None), 1: (None, None, 0), 2: (0, None, 1), 3: (0, 1, 2)}
    a_slot, r_slot, s_slot = (
        _PAD if index is None else groups[index] for index in placement[len(groups)]
    )
    a, r, s = (math.prod(shape[axis] for axis in slot) for slot in (a_slot, r_slot, s_slot))
    channel_block = min(n_channels, -(-RUN_ELEMENTS // s))
    if s >= TILE_ELEMENTS:
        n_chunks = -(-s // TILE_ELEMENTS)
        s_chunk = -(-s // n_chunks)
        row_block = 1
    else:
        n_chunks = 1
        s_chunk = s
        row_block = max(1, TILE_ELEMENTS // (s * channel_block))
    n_tiles = -(-(a * r) // row_block) * n_chunks
    slots = (a_slot, _CHANNEL, r_slot, s_slot)
    return Tiling(False, channel_block, slots, (a, n_channels, r, s), row_block, s_chunk, n_tiles)
