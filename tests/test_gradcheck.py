"""Analytic gradients against central finite differences, in float64.

The loss is a random linear function of the output, ``L = sum(y * g)``, so
``dL/dy = g`` and the backward pass with ``grad_output=g`` must give the
finite-difference derivatives of ``L`` w.r.t. input, weight and bias.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_input, random_vector

import numbabn
from numbabn import functional as F

H = 1e-6  # central differences: truncation error ~H**2, rounding ~1e-16 / H
RTOL, ATOL = 1e-6, 1e-7

SHAPES = [(5, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 2, 3), (1, 2, 3, 1)]


def numerical_gradient(loss, array: np.ndarray) -> np.ndarray:
    """d loss / d array by central differences, perturbing ``array`` in place."""
    grad = np.zeros(array.shape)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + H
        plus = loss()
        array[index] = original - H
        minus = loss()
        array[index] = original
        grad[index] = (plus - minus) / (2 * H)
    return grad


def _problem(rng, shape, layout="contiguous"):
    n_channels = shape[1]
    x = make_input(rng, shape, layout, loc=0.5, scale=2.0)
    g = rng.standard_normal(shape)
    weight = random_vector(rng, n_channels)
    bias = random_vector(rng, n_channels, low=-1.0, high=1.0)
    running_mean = rng.standard_normal(n_channels)
    running_var = rng.uniform(0.5, 2.0, n_channels)
    return x, g, weight, bias, running_mean, running_var


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_functional(shape, training, rng):
    x, g, weight, bias, rm, rv = _problem(rng, shape)

    def loss():
        # Running statistics are copied so the training forward's update does not
        # leak from one evaluation of the loss into the next.
        y = F.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training, 0.1, 1e-3)
        return float(np.sum(y * g))

    _, saved = F.batch_norm_forward(x, rm.copy(), rv.copy(), weight, bias, training, 0.1, 1e-3)
    dx, dw, db = F.batch_norm_backward(g, x, saved, weight)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw, numerical_gradient(loss, weight), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(db, numerical_gradient(loss, bias), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_no_affine(training, rng):
    x, g, _, _, rm, rv = _problem(rng, (4, 3, 3))

    def loss():
        return float(np.sum(F.batch_norm(x, rm.copy(), rv.copy(), None, None, training) * g))

    _, saved = F.batch_norm_forward(x, rm.copy(), rv.copy(), None, None, training)
    dx, dw, db = F.batch_norm_backward(g, x, saved, None)
    assert dw is None and db is None
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layout", ["channels_last", "inner_slice", "negative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_strided(layout, training, rng):
    x, g, weight, bias, rm, rv = _problem(rng, (2, 3, 3, 2), layout)

    def loss():
        y = F.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training)
        return float(np.sum(y * g))

    _, saved = F.batch_norm_forward(x, rm.copy(), rv.copy(), weight, bias, training)
    dx, dw, db = F.batch_norm_backward(g, x, saved, weight)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw, numerical_gradient(loss, weight), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("training", "track"),
    [(True, True), (False, True), (True, False), (False, False)],
    ids=["train", "eval", "train-no_track", "eval-no_track"],
)
def test_module(training, track, rng):
    """Module backward; eval without tracking uses batch statistics, hence the train formula."""
    shape = (3, 2, 2, 2)
    x, g, weight, bias, rm, rv = _problem(rng, shape)
    module = numbabn.BatchNorm2d(2, dtype=np.float64, track_running_stats=track)
    module.weight[...] = weight
    module.bias[...] = bias
    if track:
        module.load_state_dict(
            {
                "weight": weight,
                "bias": bias,
                "running_mean": rm,
                "running_var": rv,
                "num_batches_tracked": np.array(0),
            }
        )
    module.train(training)
    buffers = {key: value for key, value in module.state_dict().items() if "running" in key}

    def loss():
        for key, value in buffers.items():  # undo the running-statistics update
            getattr(module, key)[...] = value
        return float(np.sum(module(x) * g))

    module(x)
    dx = module.backward(g)
    dw, db = module.grads["weight"], module.grads["bias"]
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw, numerical_gradient(loss, module.weight), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(db, numerical_gradient(loss, module.bias), rtol=RTOL, atol=ATOL)
