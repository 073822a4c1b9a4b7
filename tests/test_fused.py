"""Batch norm fused with a residual add and a ReLU, against PyTorch's unfused composition.

Every case runs on the CPU kernels and on the CUDA kernels (in the simulator
unless a GPU is used), through the modules and the functional API.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_state, make_input, random_vector, snapshot, tolerances

import numbabn
from numbabn import functional as F

torch = pytest.importorskip("torch")

BACKENDS = ["cpu", "cuda"]


@pytest.fixture(params=BACKENDS)
def device(request):
    """ "cpu" or "cuda"; the CUDA half needs numba-cuda (the simulator is enough)."""
    if request.param == "cuda":
        pytest.importorskip("numba_cuda")
        request.getfixturevalue("cuda_small_blocks")
    return request.param


def placed(array: np.ndarray, device: str):
    if device == "cpu":
        return array
    from device import to_device

    return to_device(array)


def fetched(array, device: str) -> np.ndarray:
    if device == "cpu":
        return array
    from device import host

    return host(array)


def torch_composition(x, z, dy, weight, bias, running_mean, running_var, training, momentum):
    """relu(batch_norm(x) + z) in PyTorch, unfused; returns outputs, grads and statistics.

    ``pre`` is the ReLU's input, ``batch_norm(x) + z``.
    """
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(weight, requires_grad=True)
    tb = torch.tensor(bias, requires_grad=True)
    rm, rv = torch.tensor(running_mean), torch.tensor(running_var)
    y = torch.nn.functional.batch_norm(tx, rm, rv, tw, tb, training, momentum, 1e-5)
    tz = None
    if z is not None:
        tz = torch.tensor(z, requires_grad=True)
        y = y + tz
    pre = y.detach().numpy().copy()
    y = torch.relu(y)
    y.backward(torch.tensor(dy))
    return {
        "pre": pre,
        "y": y.detach().numpy(),
        "dx": tx.grad.numpy(),
        "dz": None if tz is None else tz.grad.numpy(),
        "dw": tw.grad.numpy(),
        "db": tb.grad.numpy(),
        "running_mean": rm.numpy(),
        "running_var": rv.numpy(),
    }


CASES = [
    ((4, 3, 5), "contiguous"),
    ((3, 5, 3, 2), "channels_last"),
    ((6, 4), "contiguous"),
    ((3, 3, 4, 5), "crop"),  # a planar view of three axis groups
]


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "residual_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "layout"), CASES)
def test_module_matches_pytorch(rng, device, shape, layout, training, with_residual):
    dtype = np.float64
    c = shape[1]
    x = make_input(rng, shape, layout, dtype)
    z = make_input(rng, shape, layout, dtype, scale=0.5) if with_residual else None
    dy = make_input(rng, shape, "contiguous", dtype)
    bn = numbabn.BatchNorm2d if len(shape) == 4 else numbabn.BatchNorm1d
    module = bn(c, dtype=dtype, device=device, activation="relu")
    weight, bias = random_vector(rng, c, dtype), random_vector(rng, c, dtype, -0.5, 0.5)
    state = {
        "weight": weight,
        "bias": bias,
        "running_mean": random_vector(rng, c, dtype, -1, 1),
        "running_var": random_vector(rng, c, dtype),
    }
    module.load_state_dict(state, strict=False)
    module.train(training)
    truth = torch_composition(
        x, z, dy, weight, bias, state["running_mean"], state["running_var"], training, 0.1
    )

    y = module(placed(x, device), residual=None if z is None else placed(z, device))
    grads = module.backward(placed(dy, device))
    dx, dz = grads if with_residual else (grads, None)

    tol = tolerances(dtype)
    np.testing.assert_allclose(fetched(y, device), truth["y"], **tol)
    np.testing.assert_allclose(fetched(dx, device), truth["dx"], **tol)
    if with_residual:
        np.testing.assert_allclose(fetched(dz, device), truth["dz"], **tol)
    np.testing.assert_allclose(fetched(module.grads["weight"], device), truth["dw"], **tol)
    np.testing.assert_allclose(fetched(module.grads["bias"], device), truth["db"], **tol)
    after = module.state_dict()
    np.testing.assert_allclose(after["running_mean"], truth["running_mean"], **tol)
    np.testing.assert_allclose(after["running_var"], truth["running_var"], **tol)


# -- a pre-activation of exactly 0 ------------------------------------------------------
# PyTorch's ReLU passes no gradient where its input is 0 (threshold_backward zeroes it
# where the input is 0 or below), and random data never makes an exact 0. Here each
# channel's values are a power of two (or 0) plus multiples of 1/4 that cancel in pairs,
# a third of them 0: the batch mean, or the running mean in eval, is that power of two
# exactly, so x - mean is exactly 0 at those points, as is mean * weight * invstd - that
# product in PyTorch's x * alpha + (bias - mean * alpha). The pre-activation is then
# exactly the bias there: 0 in the channels with no bias, and 0 with a residual of minus
# the bias in the channels of mean 0 (whose bias - 0 * alpha is the bias exactly).
ZERO_MEANS = np.array([2.0, -1.0, 0.0, 0.0])
ZERO_BIAS = np.array([0.0, 0.0, 0.5, -0.25])


def exact_zero_inputs(rng, shape, layout, dtype, with_residual):
    """``x`` (and ``z``) whose pre-activation is exactly 0 at many points; and those points."""
    n_channels = shape[1]
    assert n_channels == len(ZERO_MEANS)
    x = make_input(rng, shape, layout, dtype)
    per_channel = x.size // n_channels
    for c in range(n_channels):
        half = rng.integers(1, 9, per_channel // 2) * 0.25
        half[::3] = 0.0
        steps = np.concatenate([half, -half, np.zeros(per_channel % 2)])
        rng.shuffle(steps)
        x[:, c] = (ZERO_MEANS[c] + steps).reshape(x[:, c].shape)
    broadcast = (1, n_channels) + (1,) * (len(shape) - 2)
    at_mean = x == ZERO_MEANS.reshape(broadcast)
    z = None
    if with_residual:
        z = make_input(rng, shape, layout, dtype, scale=0.5)
        z[...] = np.where(at_mean, -ZERO_BIAS.reshape(broadcast), z)
        at_zero = at_mean
    else:
        at_zero = at_mean & (ZERO_BIAS.reshape(broadcast) == 0)
    assert at_zero[:, :2].sum() >= 2 * (per_channel // 6)
    return x, z, at_zero


ZERO_CASES = [
    ((4, 4, 3), "contiguous"),
    ((8, 4), "contiguous"),  # channels-inner
    ((3, 4, 3, 2), "channels_last"),
    ((3, 4, 3, 4), "crop"),
]
# What the CUDA simulator runs of them (seconds a case): one case per family of views.
ZERO_CASES_SIMULATED = [ZERO_CASES[0], ZERO_CASES[2], ZERO_CASES[3]]


def skip_in_simulator_unless(device, wanted):
    """On CUDA in the simulator, run this case only if ``wanted`` (a GPU runs every case)."""
    if device == "cuda" and not wanted:
        from device import SIMULATOR

        if SIMULATOR:
            pytest.skip("a GPU runs this case; the CUDA simulator runs a subset")


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "residual_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "layout"), ZERO_CASES)
def test_module_passes_no_gradient_where_the_pre_activation_is_exactly_zero(
    rng, device, shape, layout, training, with_residual
):
    skip_in_simulator_unless(device, (shape, layout) in ZERO_CASES_SIMULATED)
    dtype = np.float64
    x, z, at_zero = exact_zero_inputs(rng, shape, layout, dtype, with_residual)
    dy = make_input(rng, shape, "contiguous", dtype)
    weight = random_vector(rng, 4, dtype)
    state = {
        "weight": weight,
        "bias": ZERO_BIAS.astype(dtype),
        "running_mean": ZERO_MEANS.astype(dtype),
        "running_var": random_vector(rng, 4, dtype),
    }
    truth = torch_composition(
        x, z, dy, weight, state["bias"], state["running_mean"], state["running_var"],
        training, 0.1,
    )  # fmt: skip
    assert np.all(truth["pre"][at_zero] == 0.0)  # what the case is about

    bn = numbabn.BatchNorm2d if len(shape) == 4 else numbabn.BatchNorm1d
    module = bn(4, dtype=dtype, device=device, activation="relu")
    module.load_state_dict(state, strict=False)
    module.train(training)
    y = module(placed(x, device), residual=None if z is None else placed(z, device))
    grads = module.backward(placed(dy, device))
    dx, dz = grads if with_residual else (grads, None)

    tol = tolerances(dtype)
    np.testing.assert_array_equal(fetched(y, device)[at_zero], 0.0)
    np.testing.assert_allclose(fetched(y, device), truth["y"], **tol)
    np.testing.assert_allclose(fetched(dx, device), truth["dx"], **tol)
    if with_residual:
        np.testing.assert_array_equal(fetched(dz, device)[at_zero], 0.0)
        np.testing.assert_allclose(fetched(dz, device), truth["dz"], **tol)
    np.testing.assert_allclose(fetched(module.grads["weight"], device), truth["dw"], **tol)
    np.testing.assert_allclose(fetched(module.grads["bias"], device), truth["db"], **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "residual_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_passes_no_gradient_where_the_pre_activation_is_exactly_zero(
    rng, device, training, with_residual, dtype
):
    skip_in_simulator_unless(device, dtype == np.float64)
    shape = (4, 4, 2, 3)
    x, z, at_zero = exact_zero_inputs(rng, shape, "contiguous", dtype, with_residual)
    dy = make_input(rng, shape, "contiguous", dtype)
    weight, bias = random_vector(rng, 4, dtype), ZERO_BIAS.astype(dtype)
    running_mean, running_var = ZERO_MEANS.astype(dtype), random_vector(rng, 4, dtype)
    arrays = (x, z, dy, weight, bias, running_mean, running_var)
    as64 = [None if a is None else a.astype(np.float64) for a in arrays]
    truth = torch_composition(*as64, training, 0.1)  # in float64
    assert np.all(truth["pre"][at_zero] == 0.0)

    rm, rv = placed(running_mean.copy(), device), placed(running_var.copy(), device)
    x_, w_, b_ = placed(x, device), placed(weight, device), placed(bias, device)
    z_ = None if z is None else placed(z, device)
    y, saved = F.batch_norm_forward(
        x_, rm, rv, w_, b_, training, 0.1, residual=z_, activation="relu"
    )  # fmt: skip
    grads = F.batch_norm_backward(
        placed(dy, device), x_, saved, w_, bias=b_, residual=z_, activation="relu"
    )  # fmt: skip
    keys = ("dx", "dw", "db", "dz") if with_residual else ("dx", "dw", "db")
    assert len(grads) == len(keys)

    tol = tolerances(dtype)
    np.testing.assert_allclose(fetched(y, device), truth["y"], **tol)
    for got, key in zip(grads, keys, strict=True):
        np.testing.assert_allclose(fetched(got, device), truth[key], err_msg=key, **tol)
    np.testing.assert_allclose(fetched(rm, device), truth["running_mean"], **tol)
    np.testing.assert_allclose(fetched(rv, device), truth["running_var"], **tol)


@pytest.mark.parametrize("options", [{"affine": False}, {"track_running_stats": False}])
def test_functional_residual_without_activation(rng, device, options):
    """bn(x) + z alone: one pass forward, and backward hands dy on as dz."""
    x = make_input(rng, (5, 3, 4), "contiguous", np.float32)
    z = make_input(rng, (5, 3, 4), "contiguous", np.float32)
    dy = make_input(rng, (5, 3, 4), "contiguous", np.float32)
    plain = numbabn.BatchNorm1d(3, **options)
    module = numbabn.BatchNorm1d(3, device=device, **options)
    y = module(placed(x, device), residual=placed(z, device))
    np.testing.assert_allclose(fetched(y, device), plain(x) + z, **tolerances(np.float32))
    dx, dz = module.backward(placed(dy, device))
    np.testing.assert_allclose(fetched(dx, device), plain.backward(dy), **tolerances(np.float32))
    np.testing.assert_array_equal(fetched(dz, device), dy)


def test_functional_api_returns_the_residual_gradient(rng, device):
    x = make_input(rng, (4, 3, 2, 2), "contiguous", np.float64)
    z = make_input(rng, (4, 3, 2, 2), "contiguous", np.float64)
    dy = make_input(rng, (4, 3, 2, 2), "contiguous", np.float64)
    w, b = random_vector(rng, 3), random_vector(rng, 3, low=-0.5, high=0.5)
    dx_, dz_, x_, w_, b_ = (placed(a, device) for a in (dy, z, x, w, b))
    y, saved = F.batch_norm_forward(
        x_, None, None, w_, b_, True, residual=dz_, activation="relu"
    )  # fmt: skip
    grads = F.batch_norm_backward(dx_, x_, saved, w_, bias=b_, residual=dz_, activation="relu")
    assert len(grads) == 4
    truth = torch_composition(x, z, dy, w, b, np.zeros(3), np.ones(3), True, 0.1)
    for got, key in zip(grads, ("dx", "dw", "db", "dz"), strict=True):
        np.testing.assert_allclose(fetched(got, device), truth[key], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fetched(y, device), truth["y"], rtol=1e-10, atol=1e-10)


def test_fused_gradient_against_finite_differences(rng):
    """d/dx and d/dz of sum(r * relu(bn(x) + z)), float64, central differences."""
    x = make_input(rng, (3, 2, 2, 2), "contiguous", np.float64)
    z = make_input(rng, (3, 2, 2, 2), "contiguous", np.float64)
    r = make_input(rng, (3, 2, 2, 2), "contiguous", np.float64)

    def loss(x_value, z_value):
        module = numbabn.BatchNorm2d(2, dtype=np.float64, activation="relu")
        return float(np.sum(r * module(x_value, residual=z_value)))

    module = numbabn.BatchNorm2d(2, dtype=np.float64, activation="relu")
    module(x, residual=z)
    dx, dz = module.backward(r)
    step = 1e-6
    for array, grad, which in ((x, dx, 0), (z, dz, 1)):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            plus, minus = array.copy(), array.copy()
            plus[index] += step
            minus[index] -= step
            args_plus = (plus, z) if which == 0 else (x, plus)
            args_minus = (minus, z) if which == 0 else (x, minus)
            numeric[index] = (loss(*args_plus) - loss(*args_minus)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_errors(rng):
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        numbabn.BatchNorm2d(3, activation="gelu")
    module = numbabn.BatchNorm2d(3, activation="relu")
    x = make_input(rng, (2, 3, 2, 2), "contiguous", np.float32)
    with pytest.raises(ValueError, match=r"residual has shape \(2, 3, 2\)"):
        module(x, residual=np.zeros((2, 3, 2), np.float32))
    with pytest.raises(TypeError, match="residual has dtype float64"):
        module(x, residual=np.zeros((2, 3, 2, 2)))
    assert int(module.num_batches_tracked) == 0
    z = make_input(rng, (2, 3, 2, 2), "contiguous", np.float32)
    module(x, out=z, residual=z)
    with pytest.raises(RuntimeError, match="needs the last forward's residual"):
        module.backward(np.ones_like(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_threaded_path_on_a_large_tensor(rng, layout):
    """Above the serial threshold the fused passes run item by item across threads."""
    from numbabn._cpu.backend import PARALLEL_MIN_ELEMENTS

    shape = (4, 8, 64, 64)
    assert np.prod(shape) >= PARALLEL_MIN_ELEMENTS
    x = make_input(rng, shape, layout, np.float64)
    z = make_input(rng, shape, layout, np.float64, scale=0.5)
    dy = make_input(rng, shape, "contiguous", np.float64)
    weight, bias = random_vector(rng, 8), random_vector(rng, 8, low=-0.5, high=0.5)
    module = numbabn.BatchNorm2d(8, dtype=np.float64, activation="relu")
    module.load_state_dict({"weight": weight, "bias": bias}, strict=False)
    truth = torch_composition(x, z, dy, weight, bias, np.zeros(8), np.ones(8), True, 0.1)
    np.testing.assert_allclose(module(x, residual=z), truth["y"], rtol=1e-10, atol=1e-10)
    dx, dz = module.backward(dy)
    np.testing.assert_allclose(dx, truth["dx"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dz, truth["dz"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(module.grads["weight"], truth["dw"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_threaded_relu_without_a_residual(rng, layout, training):
    """The ReLU alone, threaded: its input gradient comes from a pass of its own, item by item.

    (With a residual the gradient goes through the residual's pass instead.) Every
    work item's values, the last one's included, against PyTorch.
    """
    from numbabn._tunables import PARALLEL_MIN_ELEMENTS
    from numbabn._views import tiling_of

    shape = (4, 8, 64, 64)
    x = make_input(rng, shape, layout, np.float64)
    assert x.size >= PARALLEL_MIN_ELEMENTS and tiling_of(x).n_items >= 8
    dy = make_input(rng, shape, "contiguous", np.float64)
    state = {
        "weight": random_vector(rng, 8),
        "bias": random_vector(rng, 8, low=-0.5, high=0.5),
        "running_mean": random_vector(rng, 8, low=-1, high=1) + np.arange(8),
        "running_var": random_vector(rng, 8),
    }
    module = numbabn.BatchNorm2d(8, dtype=np.float64, activation="relu")
    module.load_state_dict(state, strict=False)
    module.train(training)
    truth = torch_composition(
        x, None, dy, state["weight"], state["bias"], state["running_mean"],
        state["running_var"], training, 0.1,
    )  # fmt: skip
    np.testing.assert_allclose(module(x), truth["y"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(module.backward(dy), truth["dx"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(module.grads["weight"], truth["dw"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(module.grads["bias"], truth["db"], rtol=1e-9, atol=1e-9)


def test_residual_gradient_is_not_written_over(rng):
    """Without an activation, grad_output is also dz: out= must not overwrite it."""
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    z = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    dy = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    module = numbabn.BatchNorm1d(3)
    module(x, residual=z)
    before = snapshot(module)
    with pytest.raises(ValueError, match="out= shares memory with grad_output"):
        module.backward(dy, out=dy)
    assert_same_state(before, module)


@pytest.mark.parametrize("shape", [(4, 3, 6, 5), (4, 8, 64, 64)], ids=["serial", "threaded"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "residual_relu"])
def test_read_only_inputs(rng, shape, with_residual):
    """Broadcast (read-only, zero-stride) x, z and dy give what contiguous copies give."""
    channels = shape[1]
    x = np.broadcast_to(rng.standard_normal((1, *shape[1:])), shape)
    z = np.broadcast_to(rng.standard_normal((shape[0], channels, 1, 1)), shape)
    dy = np.broadcast_to(rng.standard_normal((1, channels, 1, shape[3])), shape)
    assert not (x.flags.writeable or z.flags.writeable or dy.flags.writeable)
    results = []
    for inputs in ((x, z, dy), tuple(map(np.ascontiguousarray, (x, z, dy)))):
        module = numbabn.BatchNorm2d(channels, dtype=np.float64, activation="relu")
        x_in, z_in, dy_in = inputs
        y = module(x_in, residual=z_in if with_residual else None)
        grads = module.backward(dy_in)
        grads = grads if with_residual else (grads,)
        results.append((y, *grads, module.grads["weight"], module.grads["bias"]))
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
