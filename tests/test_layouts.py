"""Any strides in, the same numbers out; output laid out like the input; ``out=`` arrays."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import layouts_for, make_input, make_layout, random_vector

import numbabn
from numbabn import functional as F
from numbabn._cpu.backend import _copy, _staging_like, _this_thread
from numbabn._tunables import STAGING_ARRAYS_KEPT

CLASSES = {2: numbabn.BatchNorm1d, 3: numbabn.BatchNorm1d, 4: numbabn.BatchNorm2d}
CLASSES[5] = numbabn.BatchNorm3d

SHAPES = [(6, 4), (4, 3, 7), (3, 4, 5, 6), (2, 3, 3, 4, 5)]
CASES = [(shape, layout) for shape in SHAPES for layout in layouts_for(len(shape))]
LARGE_CASES = [
    ((4, 3, 130, 130), layout)
    for layout in ("channels_last", "inner_slice", "crop", "negative", "channels_last_negative")
] + [((300, 1030), "fortran"), ((300, 1030), "channel_slice")]


def tol(dtype):
    if np.dtype(dtype) == np.float32:
        return {"rtol": 1e-6, "atol": 1e-6}
    return {"rtol": 1e-12, "atol": 1e-12}


def new_module(shape, dtype, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    module = CLASSES[len(shape)](shape[1], momentum=0.2, dtype=dtype)
    module.weight[...] = random_vector(rng, shape[1], dtype)
    module.bias[...] = random_vector(rng, shape[1], dtype, -1.0, 1.0)
    return module


def run(module, x, dy):
    """Train forward/backward then eval forward/backward; every result, copied."""
    results = {}
    module.train()
    results["train_y"] = module(x)
    results["train_dx"] = module.backward(dy)
    module.eval()
    results["eval_y"] = module(x)
    results["eval_dx"] = module.backward(dy)
    results.update({f"state_{k}": v for k, v in module.state_dict().items()})
    results.update({f"grad_{k}": v.copy() for k, v in module.grads.items()})
    return results


def check_against_contiguous(x, dtype, rng):
    dy = make_input(rng, x.shape, dtype=dtype)
    x_before = x.copy()
    got = run(new_module(x.shape, dtype), x, dy)
    want = run(new_module(x.shape, dtype), np.ascontiguousarray(x), dy)
    # Inputs are read, never written.
    assert x.tobytes() == x_before.tobytes()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_allclose(got[key], value, err_msg=key, **tol(dtype))
    return got


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_same_results_as_contiguous(shape, layout, dtype, rng):
    check_against_contiguous(make_input(rng, shape, layout, dtype, loc=3.0), dtype, rng)


@pytest.mark.parametrize(
    ("shape", "layout"), LARGE_CASES, ids=[f"{s}-{lay}" for s, lay in LARGE_CASES]
)
def test_same_results_as_contiguous_large(shape, layout, rng):
    check_against_contiguous(make_input(rng, shape, layout, np.float32), np.float32, rng)


@pytest.mark.parametrize(("shape", "layout"), CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_output_laid_out_like_input(shape, layout, rng):
    """Outputs and input gradients are allocated like ``np.empty_like(x)``."""
    x = make_input(rng, shape, layout, np.float32)
    expected = np.empty_like(x).strides
    module = new_module(shape, np.float32)
    assert module(x).strides == expected
    assert module.backward(np.ones_like(x)).strides == expected
    module.eval()
    assert module(x).strides == expected
    assert module.backward(np.ones_like(x)).strides == expected


# Channel and position counts on both sides of the copy's 64-wide tiles; the last
# one is large enough for Numba's threads.
COPY_SHAPES = [(2, 3, 5, 7), (2, 70, 9, 8), (1, 130, 3, 3, 3), (3, 70, 65), (4, 70, 40, 40)]


@pytest.mark.parametrize("shape", COPY_SHAPES, ids=str)
@pytest.mark.parametrize("source_layout", ["contiguous", "channels_last", "channels_last_negative"])
@pytest.mark.parametrize("target_layout", ["contiguous", "channels_last", "negative", "crop"])
def test_staging_copy_between_layouts(shape, source_layout, target_layout, rng):
    source = make_input(rng, shape, source_layout)
    target = make_input(rng, shape, target_layout)
    _copy(target, source)
    assert target.tobytes() == np.ascontiguousarray(source).tobytes()


def test_staging_arrays_reused_only_when_nothing_refers_to_them():
    x = np.empty((2, 3, 4, 5), np.float32)
    first = _staging_like(x)
    second = _staging_like(x)
    assert second is not first  # first is still referenced here
    first_id = id(first)
    del first
    assert id(_staging_like(x)) == first_id  # second still is
    other = [_staging_like(np.empty((1, 2, 3, n))) for n in range(1, 4)]
    newest_first = [id(array) for array in reversed(other)][:STAGING_ARRAYS_KEPT]
    assert [id(array) for _, array in _this_thread.staging] == newest_first


@pytest.mark.parametrize("dy_layout", ["channels_last", "negative", "inner_slice"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_grad_output_in_another_layout(x_layout, dy_layout, rng):
    shape = (3, 4, 5, 6)
    x = make_input(rng, shape, x_layout)
    dy = make_input(rng, shape, dy_layout)
    module = new_module(shape, np.float64)
    module(x)
    dx = module.backward(dy)
    reference = new_module(shape, np.float64)
    reference(np.ascontiguousarray(x))
    np.testing.assert_allclose(dx, reference.backward(np.ascontiguousarray(dy)), **tol(np.float64))
    np.testing.assert_allclose(module.grads["weight"], reference.grads["weight"], rtol=1e-12)


def test_broadcast_input(rng):
    """Zero strides (np.broadcast_to): read-only input and gradient."""
    base = rng.standard_normal((4, 3, 1, 5))
    x = np.broadcast_to(base, (4, 3, 6, 5))
    dy = np.broadcast_to(rng.standard_normal((1, 3, 6, 5)), x.shape)
    assert not x.flags.writeable and not dy.flags.writeable
    got = run(new_module(x.shape, np.float64), x, dy)
    want = run(new_module(x.shape, np.float64), np.ascontiguousarray(x), np.ascontiguousarray(dy))
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, err_msg=key, **tol(np.float64))


# -- out= -----------------------------------------------------------------------------

OUT_LAYOUTS = ["contiguous", "channels_last", "inner_slice", "negative", "crop", "fortran"]


def _empty_out(shape, layout, dtype):
    return make_layout(lambda s: np.full(s, np.nan, dtype), shape, layout)


# Every (input, out) layout pair on a small input (serial kernels); on a large input
# (parallel kernels) a few pairs: out viewed directly, and out staged through a copy.
OUT_CASES = [
    ((3, 4, 5, 6), x_layout, out_layout)
    for x_layout in ("contiguous", "channels_last", "inner_slice")
    for out_layout in OUT_LAYOUTS
] + [
    ((4, 3, 130, 130), "contiguous", "negative"),
    ((4, 3, 130, 130), "contiguous", "channels_last"),
    ((4, 3, 130, 130), "channels_last", "channels_last"),
    ((4, 3, 130, 130), "inner_slice", "fortran"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "x_layout", "out_layout"), OUT_CASES, ids=["-".join(map(str, c)) for c in OUT_CASES]
)
def test_out(shape, x_layout, out_layout, training, rng):
    dtype = np.float32
    x = make_input(rng, shape, x_layout, dtype)
    dy = make_input(rng, shape, dtype=dtype)
    plain = new_module(shape, dtype).train(training)
    with_out = new_module(shape, dtype).train(training)
    y_plain = plain(x)
    dx_plain = plain.backward(dy)

    out = _empty_out(shape, out_layout, dtype)
    strides = out.strides
    y = with_out(x, out=out)
    assert y is out and out.strides == strides
    np.testing.assert_array_equal(out, y_plain)
    grad_out = _empty_out(shape, out_layout, dtype)
    dx = with_out.backward(dy, out=grad_out)
    assert dx is grad_out
    np.testing.assert_array_equal(grad_out, dx_plain)
    np.testing.assert_array_equal(with_out.running_mean, plain.running_mean)
    np.testing.assert_array_equal(with_out.grads["weight"], plain.grads["weight"])


def test_out_only_writes_its_view(rng):
    """A sliced out writes only the elements of the view, not its neighbours."""
    x = make_input(rng, (2, 3, 4, 4), dtype=np.float32)
    buffer = np.full((2, 3, 4, 8), -7.0, np.float32)
    out = buffer[..., ::2]
    y = new_module(x.shape, np.float32)(x, out=out)
    assert y is out
    assert np.all(buffer[..., 1::2] == -7.0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "negative"])
def test_eval_in_place(layout, rng):
    """Evaluation may write the output over its own input."""
    x = make_input(rng, (3, 4, 5, 6), layout, np.float32)
    module = new_module(x.shape, np.float32)
    module(make_input(rng, x.shape, dtype=np.float32))  # some running statistics
    module.eval()
    expected = module(x.copy())
    y = module(x, out=x)
    assert y is x
    np.testing.assert_array_equal(x, expected)


def test_functional_out(rng):
    x = make_input(rng, (5, 3, 4), dtype=np.float32)
    out = np.empty_like(x)
    y, saved = F.batch_norm_forward(x, None, None, training=True, out=out)
    assert y is out
    grad_out = np.empty((5, 3, 8), np.float32)[..., ::2]
    dy = make_input(rng, x.shape, dtype=np.float32)
    dx, _, _ = F.batch_norm_backward(dy, x, saved, out=grad_out)
    assert dx is grad_out
    # A strided output takes the general-indexing kernel variant: same sums, other rounding.
    expected = F.batch_norm_backward(dy, x, saved)[0]
    np.testing.assert_allclose(grad_out, expected, rtol=1e-5, atol=1e-6)
