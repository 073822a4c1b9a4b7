"""The elementwise passes' own work items (``Tiling.elementwise_geometry``).

Planar views with one row per ``(a, c)`` are cut, for the normalisation and the
gradient, into runs of whole channels in memory order, where the statistics keep
their shorter items. Each case below takes such items (uneven channel blocks, rows
grouped with a short last group), in one call and on Numba's threads; the results
are checked against ``reference.py`` and across thread counts, to the bit.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import make_input
from test_reference import _check_eval, _check_train

import numbabn
from numbabn._tunables import ELEMENTWISE_RUN_ELEMENTS, PARALLEL_MIN_ELEMENTS
from numbabn._views import tiling_of

CASES = [
    (4, 300, 7, 7),  # one call; two blocks of 150 channels
    (9, 20, 20, 20),  # one call; two rows an item, the last item one row
    (8, 1001, 7, 7),  # threads; two blocks, of 501 and 500 channels
    (16, 130, 9, 9),  # threads; one block, a row an item
    (6, 64, 56, 56),  # threads; eleven blocks of 6 channels and one of 4
]
LAYOUTS = ["contiguous", "channel_slice", "batch_slice"]


def _items(geometry, view_shape):
    """Every item's ``(rows, channels)`` as sets, the arithmetic of the kernels' ``_bounds``."""
    channel_block, row_block, s_chunk, n_tiles = geometry
    n_rows, n_channels = view_shape[0] * view_shape[2], view_shape[1]
    assert s_chunk == view_shape[3]  # whole rows of each channel
    n_blocks = -(-n_channels // channel_block)
    for item in range(n_blocks * n_tiles):
        block, tile = divmod(item, n_tiles)
        c0, row0 = block * channel_block, tile * row_block
        yield (
            range(row0, min(n_rows, row0 + row_block)),
            range(c0, min(n_channels, c0 + channel_block)),
        )


@pytest.mark.parametrize("shape", CASES, ids=str)
def test_items_cover_each_row_once_in_long_runs(shape):
    tiling = tiling_of(np.empty(shape, np.float32))
    geometry = tiling.elementwise_geometry
    assert geometry != tiling.geometry  # guard: the case takes its own items
    covered = np.zeros((shape[0], shape[1]), np.int64)
    blocks = set()
    for rows, channels in _items(geometry, tiling.view_shape):
        covered[rows.start : rows.stop, channels.start : channels.stop] += 1
        blocks.add(len(channels))
        # Each item covers at least one whole row of each of its channels.
        assert len(rows) >= 1 and len(channels) >= 1
    assert (covered == 1).all()
    # Channel blocks of equal size but the last, as long a run as the tunable asks, or whole rows.
    assert max(blocks) - min(blocks) < max(blocks) or len(blocks) == 1
    n_channels, s = shape[1], int(np.prod(shape[2:]))
    assert geometry[0] == n_channels or geometry[0] * s >= ELEMENTWISE_RUN_ELEMENTS
    assert tiling.n_elementwise_items == sum(1 for _ in _items(geometry, tiling.view_shape))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CASES, ids=str)
def test_against_the_reference(shape, layout, rng):
    x = make_input(rng, shape, layout, np.float32)
    _check_train(x, rng, affine=True, momentum=0.3)
    _check_eval(x, rng, affine=True)


def test_cases_take_both_paths():
    sizes = [int(np.prod(shape)) for shape in CASES]
    assert max(sizes) >= PARALLEL_MIN_ELEMENTS > min(sizes)


def _steps(shape):
    rng = np.random.default_rng(3)
    x = make_input(rng, shape, dtype=np.float32, loc=10.0)
    dy = rng.standard_normal(shape).astype(np.float32)
    bn = numbabn.BatchNorm2d(shape[1], momentum=0.3)
    results = [bn(x), bn.backward(dy)]
    results.append(bn.eval()(x))
    results.append(bn.backward(dy))
    return [array.tobytes() for array in results]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba started with one thread")
@pytest.mark.parametrize(
    "shape", [shape for shape in CASES if np.prod(shape) >= PARALLEL_MIN_ELEMENTS], ids=str
)
def test_the_same_bits_on_one_thread_and_two(shape):
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        alone = _steps(shape)
        numba.set_num_threads(2)
        assert _steps(shape) == alone
    finally:
        numba.set_num_threads(previous)
