"""The kernels of every backend, through the functional API and modules, against ``reference.py``.

The semantic tests take the ``device`` fixture: each runs on the CPU kernels and
on the CUDA kernels (a GPU, or Numba's simulator with small blocks).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import CPU, make_input, random_vector, tolerances

import numbabn
from numbabn import functional as F
from numbabn._cpu.backend import PARALLEL_MIN_ELEMENTS
from numbabn._tunables import TILE_ELEMENTS
from numbabn._views import tiling_of

SMALL_SHAPES = [
    (5, 3),  # (N, C)
    (2, 1),  # smallest training batch, one channel
    (9, 6),
    (4, 3, 7),  # (N, C, L)
    (1, 2, 5),  # one sample, several positions
    (7, 4, 1),
    (3, 4, 5, 6),  # (N, C, H, W)
    (2, 1, 3, 3),
    (1, 3, 2, 2),
    (2, 5, 1, 1),
    (2, 3, 3, 4, 5),  # (N, C, D, H, W)
    (1, 2, 1, 1, 3),
    (3, 7, 11, 13),  # odd sizes
]

# Large enough for several reduction tiles per channel and the parallel kernels.
TILED_SHAPES = [
    (4, 3, 130, 130),  # H*W = 16900 > TILE_ELEMENTS: the innermost axis is chunked
    (3, 5, 70000),  # L = 70000: five chunks per row
    (70000, 3),  # (N, C) matrix: channels-inner, many position tiles
    (64, 3, 40, 40),  # many rows per tile
]
LARGE_SHAPES = [
    *TILED_SHAPES,
    (64, 64, 7, 7),  # short rows: work items span several channels
    (16, 600, 4, 4),  # channels-last: more channels than one channel block
    (300, 1030),  # (N, C) with many channels, a partial last channel block
]

# Rows and position ranges that do not split evenly into work items, where every
# TILED_SHAPES row does (16900 = 2 x 8450, 70000 = 5 x 14000): each case has a last
# chunk of a row ("chunk") or a last tile of rows or positions ("tile") shorter than
# the others. (shape, layout, which is uneven, path.)
UNEVEN_CASES = [
    ((4, 3, 131, 131), "contiguous", "chunk", "threaded"),  # rows of 17161: 8581 + 8580
    ((1, 2, 131, 131), "contiguous", "chunk", "serial"),  # the same rows, in one call
    ((3, 5, 40000), "contiguous", "chunk", "threaded"),  # 2 x 13334 + 13332
    ((50001, 3), "fortran", "chunk", "threaded"),  # N inner, rows of 50001: 3 x 12501 + 12498
    ((4, 3, 131, 131), "channels_last", "tile", "threaded"),  # 68644 positions: 12 x 5461 + 3112
    ((50001, 3), "contiguous", "tile", "threaded"),  # (N, C): 9 x 5461 + 852 positions
    ((67, 3, 40, 40), "contiguous", "tile", "threaded"),  # 13 x 5 + 2 rows; channels 2 + 1
]
_uneven = pytest.mark.parametrize(
    ("shape", "layout", "uneven", "path"),
    UNEVEN_CASES,
    ids=[f"{shape}-{layout}" for shape, layout, _, _ in UNEVEN_CASES],
)

DTYPES = [np.float32, np.float64]
# What the CUDA simulator runs of SMALL_SHAPES: one of each rank, and one channel.
SIMULATED_SHAPES = [(5, 3), (2, 1), (4, 3, 7), (3, 4, 5, 6), (2, 3, 3, 4, 5)]


def _params(rng, n_channels, dtype, affine):
    if not affine:
        return None, None
    return random_vector(rng, n_channels, dtype), random_vector(rng, n_channels, dtype, -0.5, 0.5)


def _running(rng, n_channels, dtype):
    return (
        rng.normal(0.0, 1.0, n_channels).astype(dtype),
        rng.uniform(0.5, 2.0, n_channels).astype(dtype),
    )


def _check_train(x, rng, affine, device=CPU, momentum=0.1, eps=1e-5):
    dtype = x.dtype
    n_channels = x.shape[1]
    weight, bias = _params(rng, n_channels, dtype, affine)
    rm, rv = _running(rng, n_channels, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    expected = ref.forward(x, weight, bias, rm, rv, True, momentum, eps)

    put, get = device.put, device.get
    d_x, d_w, d_rm, d_rv = put(x), put(weight), put(rm), put(rv)
    y, saved = F.batch_norm_forward(d_x, d_rm, d_rv, d_w, put(bias), True, momentum, eps)
    y, rm, rv = get(y), get(d_rm), get(d_rv)
    tol = tolerances(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, expected.output, **tol)
    np.testing.assert_allclose(get(saved.mean), expected.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(get(saved.invstd), expected.invstd, rtol=1e-10)
    assert saved.batch_stats
    np.testing.assert_allclose(rm, expected.running_mean, **tol)
    np.testing.assert_allclose(rv, expected.running_var, **tol)
    assert rm.dtype == dtype and rv.dtype == dtype

    grads = ref.backward(dy, x, expected.mean, expected.invstd, weight, batch_stats=True)
    dx, dw, db = (get(a) for a in F.batch_norm_backward(put(dy), d_x, saved, d_w))
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, grads.grad_input, **tol)
    if affine:
        assert dw.dtype == dtype and db.dtype == dtype
        np.testing.assert_allclose(dw, grads.grad_weight, **tol)
        np.testing.assert_allclose(db, grads.grad_bias, **tol)
    else:
        assert dw is None and db is None


def _check_eval(x, rng, affine, device=CPU, eps=1e-5):
    dtype = x.dtype
    n_channels = x.shape[1]
    weight, bias = _params(rng, n_channels, dtype, affine)
    rm, rv = _running(rng, n_channels, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    expected = ref.forward(x, weight, bias, rm, rv, False, 0.1, eps)

    put, get = device.put, device.get
    d_x, d_w, d_rm, d_rv = put(x), put(weight), put(rm), put(rv)
    y, saved = F.batch_norm_forward(d_x, d_rm, d_rv, d_w, put(bias), False, 0.1, eps)
    tol = tolerances(dtype)
    np.testing.assert_allclose(get(y), expected.output, **tol)
    assert not saved.batch_stats
    # Evaluation never touches the running statistics.
    assert get(d_rm).tobytes() == rm.tobytes() and get(d_rv).tobytes() == rv.tobytes()

    grads = ref.backward(dy, x, expected.mean, expected.invstd, weight, batch_stats=False)
    dx, dw, db = (get(a) for a in F.batch_norm_backward(put(dy), d_x, saved, d_w))
    np.testing.assert_allclose(dx, grads.grad_input, **tol)
    # dx = dy * w * invstd_running, by the formula itself.
    w = np.ones(n_channels) if weight is None else weight.astype(np.float64)
    direct = dy * (w / np.sqrt(rv.astype(np.float64) + eps)).reshape(
        (1, n_channels) + (1,) * (x.ndim - 2)
    )
    np.testing.assert_allclose(dx, direct, **tol)
    if affine:
        np.testing.assert_allclose(dw, grads.grad_weight, **tol)
        np.testing.assert_allclose(db, grads.grad_bias, **tol)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_train_small(shape, dtype, affine, rng, device):
    device.skip_unless(shape in SIMULATED_SHAPES and affine)
    _check_train(make_input(rng, shape, dtype=dtype), rng, affine, device)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_eval_small(shape, dtype, affine, rng, device):
    device.skip_unless(shape in SIMULATED_SHAPES and affine)
    _check_eval(make_input(rng, shape, dtype=dtype), rng, affine, device)


def _with_layouts(shapes):
    """Each shape contiguous and in its other natural layout (channels-last, or (N, C) in
    Fortran order, which makes the batch axis the inner one)."""
    cases = []
    for shape in shapes:
        other = "fortran" if len(shape) == 2 else "channels_last"
        cases += [(shape, "contiguous"), (shape, other)]
    return pytest.mark.parametrize(
        ("shape", "layout"), cases, ids=[f"{shape}-{layout}" for shape, layout in cases]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@_with_layouts(LARGE_SHAPES)
def test_large(shape, layout, dtype, rng):
    x = make_input(rng, shape, layout, dtype)
    _check_train(x, rng, affine=True, momentum=0.3)
    _check_eval(x, rng, affine=True)


@_with_layouts(TILED_SHAPES)
def test_large_shapes_are_large(shape, layout):
    """Guard: the large shapes really do take the tiled, parallel code paths."""
    x = make_input(np.random.default_rng(0), shape, layout, np.float32, scale=0.0)
    tiling = tiling_of(x)
    assert x.size >= PARALLEL_MIN_ELEMENTS
    assert tiling.n_tiles > 1
    if not tiling.channels_inner:
        # Each tile holds at most TILE_ELEMENTS values of one channel.
        assert x.size // shape[1] > TILE_ELEMENTS


@_uneven
def test_uneven_splits_are_uneven(shape, layout, uneven, path):
    """Guard: each uneven case has the short last chunk or tile it says, on the path it says."""
    x = make_input(np.random.default_rng(0), shape, layout, np.float32, scale=0.0)
    tiling = tiling_of(x)
    view = tiling.view_shape
    n_rows, n_s = (view[0], 1) if tiling.channels_inner else (view[0] * view[2], view[3])
    if uneven == "chunk":
        assert not tiling.channels_inner
        assert n_s > tiling.s_chunk and n_s % tiling.s_chunk != 0
    else:
        assert n_rows > tiling.row_block and n_rows % tiling.row_block != 0
    assert (x.size >= PARALLEL_MIN_ELEMENTS) == (path == "threaded")


@pytest.mark.parametrize("dtype", DTYPES)
@_uneven
def test_uneven_splits(shape, layout, uneven, path, dtype, rng):
    """Training and eval, forward and backward, with a short last chunk or tile."""
    x = make_input(rng, shape, layout, dtype)
    _check_train(x, rng, affine=True, momentum=0.3)
    _check_eval(x, rng, affine=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_far_from_zero_mean(dtype, rng, device):
    """Data whose mean is large compared to its spread keeps its precision."""
    x = make_input(rng, (4, 3, 5, 5), dtype=dtype, loc=1e3, scale=1e-2)
    _check_train(x, rng, True, device)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_eps_inside_sqrt(eps, rng, device):
    x = make_input(rng, (6, 3, 4), scale=0.1)
    y, saved = F.batch_norm_forward(device.put(x), None, None, training=True, eps=eps)
    _, var = ref.batch_mean_var(x)
    np.testing.assert_allclose(device.get(saved.invstd), 1 / np.sqrt(var + eps), rtol=1e-12)
    expected = ref.forward(x, training=True, eps=eps).output
    np.testing.assert_allclose(device.get(y), expected, rtol=1e-10)


def test_constant_channel(rng, device):
    """Zero variance: xhat is 0, the output is the bias, dx is 0 in training."""
    x = np.full((4, 2, 3), 7.0)
    x[:, 1] = rng.standard_normal((4, 3))
    put, get = device.put, device.get
    weight, bias = put(np.array([2.0, 1.0])), put(np.array([0.25, 0.0]))
    y, saved = F.batch_norm_forward(put(x), None, None, weight, bias, training=True)
    np.testing.assert_allclose(get(y)[:, 0], 0.25, atol=1e-12)
    grads = F.batch_norm_backward(put(np.ones_like(x)), put(x), saved, weight)
    dx, dw, db = (get(grad) for grad in grads)
    np.testing.assert_allclose(dx[:, 0], 0.0, atol=1e-12)
    assert dw[0] == 0.0 and db[0] == 12.0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_module_sequence(momentum, affine, bias, rng, device):
    """Several train and eval steps of a module track the stateful reference."""
    device.skip_unless(affine and bias and momentum != 0.3)
    shape = (6, 3, 5)
    module = numbabn.BatchNorm1d(3, momentum=momentum, affine=affine, bias=bias, dtype=np.float64)
    truth = ref.ReferenceBatchNorm(3, momentum=momentum, affine=affine, bias=bias)
    if affine:
        module.weight[...] = truth.weight[...] = random_vector(rng, 3)
    if affine and bias:
        module.bias[...] = truth.bias[...] = random_vector(rng, 3, low=-1.0, high=1.0)
    module.to(device.name)
    put, get = device.put, device.get
    for step, training in enumerate([True, True, False, True, False, True]):
        module.train(training)
        truth.training = training
        x = make_input(rng, shape, loc=step)
        dy = rng.standard_normal(shape)
        tol = {"rtol": 1e-10, "atol": 1e-10}
        np.testing.assert_allclose(get(module(put(x))), truth.forward(x), **tol)
        np.testing.assert_allclose(get(module.backward(put(dy))), truth.backward(dy), **tol)
        np.testing.assert_allclose(get(module.running_mean), truth.running_mean, rtol=1e-12)
        np.testing.assert_allclose(get(module.running_var), truth.running_var, rtol=1e-12)
        assert int(module.num_batches_tracked) == truth.num_batches_tracked
        if affine:
            np.testing.assert_allclose(get(module.grads["weight"]), truth.grad_weight, rtol=1e-10)
        if affine and bias:
            np.testing.assert_allclose(get(module.grads["bias"]), truth.grad_bias, rtol=1e-10)
    assert int(module.num_batches_tracked) == 4


def test_cumulative_average(rng, device):
    """momentum=None: the running mean is the plain average of the batch means."""
    module = numbabn.BatchNorm2d(2, momentum=None, dtype=np.float64, device=device.name)
    means, variances = [], []
    for step in range(4):
        x = make_input(rng, (3, 2, 4, 4), loc=10.0 * step)
        module(device.put(x))
        mean, var = ref.batch_mean_var(x)
        means.append(mean)
        variances.append(var * 48 / 47)
    # Starting values (0 and 1) are replaced entirely by the first batch.
    running_mean, running_var = device.get(module.running_mean), device.get(module.running_var)
    np.testing.assert_allclose(running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(running_var, np.mean(variances, axis=0), rtol=1e-12)
    assert module.num_batches_tracked == 4 and module.num_batches_tracked.dtype == np.int64


def test_reference_matches_torch(rng):
    """The oracle itself agrees with PyTorch (float64), train and eval, forward and backward."""
    torch = pytest.importorskip("torch")
    shape = (4, 3, 5, 2)
    x = make_input(rng, shape)
    dy = rng.standard_normal(shape)
    weight, bias = random_vector(rng, 3), random_vector(rng, 3)
    for training in (True, False):
        tm = torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64).train(training)
        truth = ref.ReferenceBatchNorm(3, momentum=0.3)
        truth.training = training
        with torch.no_grad():
            tm.weight.copy_(torch.from_numpy(weight))
            tm.bias.copy_(torch.from_numpy(bias))
            tm.running_mean.fill_(0.5)
            tm.running_var.fill_(2.0)
        truth.weight, truth.bias = weight.copy(), bias.copy()
        truth.running_mean, truth.running_var = np.full(3, 0.5), np.full(3, 2.0)
        tx = torch.from_numpy(x.copy()).requires_grad_()
        ty = tm(tx)
        ty.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(truth.forward(x), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(truth.backward(dy), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(truth.grad_weight, tm.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(truth.grad_bias, tm.bias.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(truth.running_mean, tm.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(truth.running_var, tm.running_var.numpy(), rtol=1e-12)
