"""Channels-inner rows of lanes: narrow rows grouped, wide rows whole, against ``reference.py``.

The channels-inner elementwise passes (the normalisation and the input gradient)
take ``lane_rows`` adjacent positions of a narrow row as one row of lanes:
C-contiguous operands are walked a row of lanes at a time, any other a position
at a time, and the positions an item has beyond its last whole row of lanes one
at a time. Each case below has such leftovers, in one call and on Numba's
threads, and each layout takes one of the two walks.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_input
from test_reference import _check_eval, _check_train

from numbabn._tunables import LANE_ELEMENTS, PARALLEL_MIN_ELEMENTS
from numbabn._views import tiling_of

# (shape, path): rows of 16, 24 and 40 channels (8, 6 and 4 positions a row of lanes), and
# wide rows of 2000 channels, an item taking whole rows.
CASES = [
    ((1003, 16), "serial"),  # 125 rows of lanes and 3 positions
    ((1018, 24), "serial"),  # 169 rows of lanes (an odd count: one without a pair) and 4
    ((617, 40), "serial"),  # 154 rows of lanes and 1 position
    ((9001, 24), "threaded"),  # tiles of 682 positions (113 rows of lanes and 4), the last of 135
    ((129, 2000), "threaded"),  # tiles of 128 positions and one of 1
]
LAYOUTS = ["contiguous", "channel_slice", "batch_slice"]


def _cases():
    return pytest.mark.parametrize(
        ("shape", "path", "layout"),
        [(shape, path, layout) for shape, path in CASES for layout in LAYOUTS],
        ids=[f"{shape}-{layout}" for shape, _ in CASES for layout in LAYOUTS],
    )


@_cases()
def test_cases_take_the_paths_they_name(shape, path, layout):
    """Guard: grouped rows where the rows are narrow, and the serial or threaded path named."""
    x = make_input(np.random.default_rng(0), shape, layout, np.float32)
    tiling = tiling_of(x)
    assert tiling.channels_inner
    assert tiling.lane_rows == -(-LANE_ELEMENTS // shape[1])
    assert tiling.channel_block == shape[1]
    assert (x.size >= PARALLEL_MIN_ELEMENTS) == (path == "threaded")
    # Only contiguous data is walked a row of lanes at a time.
    assert x.flags.c_contiguous == (layout == "contiguous")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@_cases()
def test_lanes(shape, path, layout, dtype, rng):
    """Training and eval, forward and backward."""
    x = make_input(rng, shape, layout, dtype)
    _check_train(x, rng, affine=True, momentum=0.3)
    _check_eval(x, rng, affine=True)


@pytest.mark.parametrize(("shape", "path"), CASES, ids=[str(shape) for shape, _ in CASES])
def test_both_walks_agree(shape, path, rng):
    """The same values, walked a row of lanes at a time and a position at a time."""
    import numbabn

    contiguous = make_input(rng, shape, dtype=np.float32, loc=100.0)
    strided = make_input(rng, shape, "channel_slice", np.float32)
    strided[...] = contiguous
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for x in (contiguous, strided):
        bn = numbabn.BatchNorm1d(shape[1], momentum=1.0, dtype=np.float32)
        y = bn(x)
        results.append((y, bn.backward(dy), bn.running_mean.copy()))
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
