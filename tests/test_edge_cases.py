"""Edge cases: empty batches, extreme momentum and eps, in-place output, tiny batches."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import assert_same_state, make_input, snapshot

import numbabn
from numbabn import functional as F

EAGER = {2: numbabn.BatchNorm1d, 3: numbabn.BatchNorm1d, 4: numbabn.BatchNorm2d}
EAGER[5] = numbabn.BatchNorm3d
LAZY = {2: numbabn.LazyBatchNorm1d, 3: numbabn.LazyBatchNorm1d, 4: numbabn.LazyBatchNorm2d}
LAZY[5] = numbabn.LazyBatchNorm3d
EMPTY_SHAPES = [(0, 3), (0, 3, 4), (0, 3, 2, 2), (0, 3, 1, 2, 2), (2, 3, 0), (2, 3, 0, 4)]


# -- zero-size batch -----------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_training(shape, momentum, rng):
    """Empty output, running stats untouched, counter incremented (as PyTorch does)."""
    module = EAGER[len(shape)](3, momentum=momentum)
    full = (4, 3, *(2 for _ in shape[2:]))
    module(make_input(rng, full, dtype=np.float32))
    module.backward(np.ones(full, np.float32))
    mean, var = module.running_mean.copy(), module.running_var.copy()
    grad_weight = module.grads["weight"].copy()

    y = module(np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    assert int(module.num_batches_tracked) == 2
    assert mean.tobytes() == module.running_mean.tobytes()
    assert var.tobytes() == module.running_var.tobytes()
    dx = module.backward(np.zeros(shape, np.float32))
    assert dx.shape == shape and dx.dtype == np.float32
    # Nothing to add to the gradients.
    np.testing.assert_array_equal(module.grads["weight"], grad_weight)


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_eval(shape):
    module = EAGER[len(shape)](3).eval()
    before = snapshot(module)
    y = module(np.zeros(shape, np.float32))
    assert y.shape == shape
    assert_same_state(before, module)


def test_empty_batch_functional():
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    y, saved = F.batch_norm_forward(np.zeros((0, 3, 4)), rm, rv, training=True)
    assert y.shape == (0, 3, 4)
    assert np.all(rm == 0.5) and np.all(rv == 2.0)
    dx, dw, db = F.batch_norm_backward(np.zeros((0, 3, 4)), np.zeros((0, 3, 4)), saved, np.ones(3))
    assert dx.shape == (0, 3, 4)
    np.testing.assert_array_equal(dw, 0.0)
    np.testing.assert_array_equal(db, 0.0)


def test_empty_batch_with_out():
    out = np.zeros((0, 3, 2, 2), np.float32)
    assert numbabn.BatchNorm2d(3)(np.zeros((0, 3, 2, 2), np.float32), out=out) is out


@pytest.mark.parametrize("shape", [(0, 5, 2, 2), (3, 5, 2, 2)], ids=str)
def test_lazy_infers_from_shape_1(shape):
    module = numbabn.LazyBatchNorm2d()
    module(np.ones(shape, np.float32) * np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2))
    assert isinstance(module, numbabn.BatchNorm2d)
    assert module.num_features == 5
    assert module.weight.shape == module.running_mean.shape == (5,)
    assert int(module.num_batches_tracked) == 1


def test_zero_channels():
    module = numbabn.BatchNorm1d(0)
    y = module(np.zeros((4, 0), np.float32))
    assert y.shape == (4, 0)


# -- momentum and eps ------------------------------------------------------------------


def test_momentum_zero_keeps_running_stats(rng):
    module = numbabn.BatchNorm1d(3, momentum=0.0, dtype=np.float64)
    module(make_input(rng, (5, 3), loc=4.0))
    np.testing.assert_array_equal(module.running_mean, 0.0)
    np.testing.assert_array_equal(module.running_var, 1.0)
    assert int(module.num_batches_tracked) == 1


def test_momentum_one_takes_batch_stats(rng):
    x = make_input(rng, (5, 3, 4), loc=4.0)
    module = numbabn.BatchNorm1d(3, momentum=1.0, dtype=np.float64)
    module(x)
    mean, var = ref.batch_mean_var(x)
    np.testing.assert_allclose(module.running_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(module.running_var, var * 20 / 19, rtol=1e-13)


def test_momentum_none_first_batch_replaces_defaults(rng):
    x = make_input(rng, (5, 3, 4), loc=-2.0)
    module = numbabn.BatchNorm1d(3, momentum=None, dtype=np.float64)
    module(x)
    mean, var = ref.batch_mean_var(x)
    np.testing.assert_allclose(module.running_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(module.running_var, var * 20 / 19, rtol=1e-13)


def test_large_eps(rng):
    x = make_input(rng, (6, 2, 3))
    y = numbabn.BatchNorm1d(2, eps=1e6, dtype=np.float64)(x)
    np.testing.assert_allclose(y, ref.forward(x, eps=1e6).output, rtol=1e-12, atol=1e-15)
    assert np.abs(y).max() < 1e-2


def test_two_values_per_channel():
    """The smallest training batch: biased variance for normalising, unbiased for the stats.

    Training takes a positive eps only, as in PyTorch; 1e-300 vanishes next to the variance.
    """
    x = np.array([[1.0, 10.0], [3.0, -10.0]])
    module = numbabn.BatchNorm1d(2, momentum=1.0, eps=1e-300, dtype=np.float64)
    np.testing.assert_allclose(module(x), [[-1.0, 1.0], [1.0, -1.0]], rtol=1e-15)
    np.testing.assert_allclose(module.running_var, [2.0, 200.0], rtol=1e-15)


# -- in-place output and backward -------------------------------------------------------


@pytest.mark.parametrize(
    ("training", "track", "affine"),
    [
        (True, True, True),
        (True, False, True),
        (False, True, True),
        (False, False, True),
        (False, True, False),
    ],
    ids=["train", "train-no_track", "eval", "eval-no_track", "eval-no_affine"],
)
def test_in_place_output_then_backward(training, track, affine, rng):
    """``out=x`` gives the right output; a backward that needs the lost input refuses.

    Backward needs the forward's input for ``dx`` with batch statistics and for
    ``dweight``; only eval without affine parameters can do without it.
    """
    shape = (4, 3, 5, 5)
    x = make_input(rng, shape)
    dy = rng.standard_normal(shape)

    def new():
        module = numbabn.BatchNorm2d(3, dtype=np.float64, track_running_stats=track, affine=affine)
        if affine:
            module.weight[...] = [0.5, 2.0, 3.0]
        if track:
            module.running_mean[...] = [0.1, 0.2, 0.3]
            module.running_var[...] = [1.5, 0.5, 2.0]
        return module.train(training)

    expected_module = new()
    expected_y = expected_module(x.copy())
    expected_dx = expected_module.backward(dy)

    module = new()
    x_in_place = x.copy()
    y = module(x_in_place, out=x_in_place)
    assert y is x_in_place
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-12)
    needs_input = training or not track or affine
    if needs_input:
        before = snapshot(module)
        with pytest.raises(RuntimeError, match="out="):
            module.backward(dy)
        assert_same_state(before, module)
    else:
        np.testing.assert_allclose(module.backward(dy), expected_dx, rtol=1e-12, atol=1e-12)


def test_forward_does_not_modify_input(rng):
    x = make_input(rng, (4, 3, 5, 5))
    before = x.copy()
    module = numbabn.BatchNorm2d(3, dtype=np.float64)
    module(x)
    module.backward(np.ones_like(x))
    module.eval()
    module(x)
    assert x.tobytes() == before.tobytes()


def test_eval_backward_may_write_over_grad_output(rng):
    """dweight and dbias come from grad_output before out= overwrites it."""
    x = make_input(rng, (4, 3, 5), "contiguous", np.float64)
    dy = make_input(rng, (4, 3, 5), "contiguous", np.float64)
    module = numbabn.BatchNorm1d(3, dtype=np.float64).eval()
    module(x)
    expected = module.backward(dy.copy())
    expected_grads = {name: grad.copy() for name, grad in module.grads.items()}
    module.zero_grad()
    module(x)
    in_place = dy.copy()
    module.backward(in_place, out=in_place)
    np.testing.assert_array_equal(in_place, expected)
    for name, grad in expected_grads.items():
        np.testing.assert_array_equal(module.grads[name], grad)


def test_empty_batch_statistics_are_fresh_arrays():
    x = np.zeros((0, 3, 2), np.float32)
    _, saved = F.batch_norm_forward(x, None, None, training=True)
    saved.mean[:] = 5.0
    _, again = F.batch_norm_forward(x, None, None, training=True)
    assert again.mean.tolist() == [0.0, 0.0, 0.0]


def test_zero_running_variance_with_zero_eps_divides_as_floats():
    """Evaluation with eps=0 takes a zero running variance: 1 / 0 is inf, not an exception."""
    x = np.ones((2, 3, 4), np.float32)
    zeros = np.zeros(3, np.float32)
    y, saved = F.batch_norm_forward(x, zeros, zeros, eps=0.0)
    assert np.isinf(saved.invstd).all()
    assert np.isinf(y).all()
