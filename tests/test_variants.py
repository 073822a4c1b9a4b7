"""Any mix of memory layouts runs on two compiled variants per kernel and dtype.

Once a C-contiguous and a strided call (and a C-contiguous and a strided staging
copy between layouts) have compiled (or loaded) their variants, inputs,
gradients, residuals and outputs in any other layout, read-only or not, must not
compile or load anything more: that is what keeps the first call of a new
layout, and the warm-up, short.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import layouts_for, make_input

import numbabn
from numbabn._cpu.backend import PARALLEL_MIN_ELEMENTS
from numbabn.warmup import compile_counts

SHAPES = {"serial": (2, 4, 6, 6), "threaded": (4, 4, 96, 96)}
assert np.prod(SHAPES["serial"]) < PARALLEL_MIN_ELEMENTS <= np.prod(SHAPES["threaded"])
LAYOUTS = layouts_for(4)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _train_step(rng, shape, x_layout, dy_layout, out_layout, read_only, relu=False):
    module = numbabn.BatchNorm2d(shape[1], dtype=np.float32, activation="relu" if relu else None)
    x, dy, z = (
        make_input(rng, shape, layout, np.float32) for layout in (x_layout, dy_layout, dy_layout)
    )
    if read_only:
        x, dy = _read_only(x), _read_only(dy)
    out = make_input(rng, shape, out_layout, np.float32)
    module(x, residual=z if relu else None, out=out)
    module.backward(dy)
    module.eval()
    module(x, residual=z if relu else None)
    module.backward(dy)


@pytest.mark.parametrize("size", ["serial", "threaded"])
def test_layout_mixes_compile_nothing_more(size):
    rng = np.random.default_rng(0)
    shape = SHAPES[size]
    for layout, relu in itertools.product(("contiguous", "crop", "channels_last"), (False, True)):
        _train_step(rng, shape, layout, layout, layout, False, relu)
    # A gradient and an output to stage (copy) into the input's layout, in both directions.
    _train_step(rng, shape, "contiguous", "channels_last", "channels_last", False)
    _train_step(rng, shape, "channels_last", "contiguous", "contiguous", False)
    # The staging copy has two variants too: the copies above are between C-contiguous
    # views and compile only the first; one whose operand is a strided view compiles the
    # other. (Without it the mixes below compiled it, unless an earlier test in the same
    # process happened to.)
    _train_step(rng, shape, "channels_last", "batch_slice", "batch_slice", False)
    before = compile_counts()
    mixes = [
        (x_layout, other, other, read_only, relu)
        for x_layout, other in itertools.product(("contiguous", "channels_last", "crop"), LAYOUTS)
        for read_only, relu in ((False, False), (True, True))
    ]
    for x_layout, dy_layout, out_layout, read_only, relu in mixes:
        _train_step(rng, shape, x_layout, dy_layout, out_layout, read_only, relu)
    assert compile_counts() == before
