"""NaN and infinities in every input, against PyTorch's NaN/Inf pattern.

A non-finite value in the input, the residual, ``dy``, the parameters or the
running statistics must leave NaN, +inf and -inf exactly where PyTorch leaves
them, in the output, every gradient and the running statistics, and the finite
values must be PyTorch's. Each case runs on the CPU kernels (the one-call serial
path, and the threaded path for large tensors) and on the CUDA kernels (in the
simulator unless a GPU is used).

The oracle is PyTorch in float64 on C-contiguous copies of the inputs (its
channels-last kernel is not needed: float32 and channels-last results are held
to the same float64 NCHW truth); for bfloat16 and float16 data it is PyTorch in
that type, with float32 parameters, whose results overflow where the type does.
One exception: with an infinite weight, PyTorch's CPU forward gives NaN where its
CUDA forward gives +-inf. The CPU kernel folds the mean into the bias,
``x * (w * invstd) + (b - mean * w * invstd)``, which is ``inf - inf``; the CUDA
kernel computes ``(x - mean) * invstd * w + b`` as numbabn does (subtracting the
mean first keeps data far from zero precise). The output is then held to that
formula, and the ReLU cases, whose mask follows from the output, are left out.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CPU, from_torch, make_input, random_vector, to_torch

from numbabn import functional as F

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

# The CUDA simulator runs kernels on NumPy scalars, which warn on inf - inf and the like.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

NAN, INF = np.nan, np.inf
MOMENTUM, EPS = 0.1, 1e-5
# (rtol, atol) for finite values against the float64 truth.
# Half results against PyTorch's half results: a few units in the last place of each.
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(ml_dtypes.bfloat16): (2e-2, 2e-2),
    np.dtype(np.float16): (3e-3, 3e-3),
}

# Where each scenario puts its non-finite values. Four channels: the last stays
# finite everywhere, so a non-finite value must not leak into other channels.
# Element (0, c, 0, 0) is where the statistics sums take their shift from.
SCENARIOS = {
    "x_nan": {"x": [((1, 0, 1, 0), NAN), ((0, 2, 0, 0), NAN)]},
    "x_inf": {"x": [((0, 0, 0, 0), INF), ((1, 1, 1, 1), -INF), ((2, 2, 0, 1), INF)]},
    "x_inf_pairs": {
        "x": [((0, 0, 0, 0), INF), ((1, 0, 1, 1), -INF), ((0, 1, 0, 0), -INF), ((2, 1, 1, 0), -INF)]
    },
    "residual": {"z": [((1, 0, 1, 0), NAN), ((0, 1, 1, 1), INF), ((2, 2, 0, 1), -INF)]},
    "dy": {"dy": [((1, 0, 1, 0), NAN), ((0, 1, 1, 1), INF), ((2, 2, 0, 1), -INF)]},
    "weight_nan": {"weight": [(0, NAN), (2, NAN)]},
    "weight_inf": {"weight": [(1, INF), (2, -INF)]},
    "bias": {"bias": [(0, NAN), (1, INF), (2, -INF)]},
    "running_mean": {"running_mean": [(0, NAN), (1, INF), (2, -INF)]},
    "running_var": {"running_var": [(0, NAN), (1, INF), (2, -INF)]},
}
# name: (training, affine)
MODES = {"train": (True, True), "train_no_affine": (True, False), "eval": (False, True)}
# name: (residual, relu)
EPILOGUES = {
    "plain": (False, False),
    "relu": (False, True),
    "residual": (True, False),
    "residual_relu": (True, True),
}


# ``make test`` runs the CUDA kernels on every scenario (test_cuda_quick); the whole grid
# on CUDA takes minutes in the simulator, so it runs in ``make test-long``. The ``device``
# fixture is conftest's, parametrized here.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.long)]


def _inputs(rng, shape, layout, dtype, scenario, with_residual, index_scale=1, param_dtype=None):
    """Finite random inputs, then the scenario's non-finite values written in.

    ``index_scale`` stretches the scenario's spatial indices over larger shapes;
    parameters and running statistics are ``param_dtype`` (default ``dtype``).
    """
    c = shape[1]
    param_dtype = param_dtype or dtype
    arrays = {
        "x": make_input(rng, shape, layout, dtype),
        "z": make_input(rng, shape, layout, dtype, scale=0.5) if with_residual else None,
        "dy": make_input(rng, shape, layout, dtype),
        "weight": random_vector(rng, c, param_dtype, -1.5, 1.5),
        "bias": random_vector(rng, c, param_dtype, -0.5, 0.5),
        "running_mean": random_vector(rng, c, param_dtype, -1, 1),
        "running_var": random_vector(rng, c, param_dtype),
    }
    for name, values in SCENARIOS[scenario].items():
        if arrays[name] is None:
            pytest.skip("the scenario needs a residual")
        for index, value in values:
            if isinstance(index, tuple):
                index = (*index[:2], *(i * index_scale for i in index[2:]))
            arrays[name][index] = value
    return arrays


def _torch_truth(arrays, training, affine, relu):
    """relu(batch_norm(x) + z) in float64 PyTorch (C-contiguous): outputs, grads, statistics.

    Half data (and its parameters) stay in their types instead.
    """
    half = arrays["x"].itemsize == 2

    def tensor(name, grad=False):
        array = arrays[name]
        if array is None:
            return None
        if half:
            return to_torch(np.ascontiguousarray(array)).clone().requires_grad_(grad)
        return torch.tensor(np.asarray(array, np.float64), requires_grad=grad)

    x, z, dy = tensor("x", True), tensor("z", True), tensor("dy")
    weight, bias = (tensor("weight", True), tensor("bias", True)) if affine else (None, None)
    running_mean, running_var = tensor("running_mean"), tensor("running_var")
    y = torch.nn.functional.batch_norm(
        x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS
    )
    if z is not None:
        y = y + z
    if relu:
        y = torch.relu(y)
    y.backward(dy)

    def numpy(t):
        return None if t is None else from_torch(t.detach()).astype(np.float64)

    return {
        "y": numpy(y),
        "dx": numpy(x.grad),
        "dz": None if z is None else numpy(z.grad),
        "dweight": None if weight is None else numpy(weight.grad),
        "dbias": None if bias is None else numpy(bias.grad),
        "running_mean": numpy(running_mean),
        "running_var": numpy(running_var),
    }


def _ours(arrays, training, affine, relu, device):
    """The same through numbabn's functional API on ``device``."""
    on = {name: device.put(None if a is None else a.copy()) for name, a in arrays.items()}
    if device.name == "cpu":
        # Copies keep the layout only for C-contiguous data: restore the caller's strides.
        on["x"], on["z"], on["dy"] = arrays["x"], arrays["z"], arrays["dy"]
    weight, bias = (on["weight"], on["bias"]) if affine else (None, None)
    activation = "relu" if relu else None
    y, saved = F.batch_norm_forward(
        on["x"], on["running_mean"], on["running_var"], weight, bias, training, MOMENTUM, EPS,
        residual=on["z"], activation=activation,
    )  # fmt: skip
    grads = F.batch_norm_backward(
        on["dy"], on["x"], saved, weight, bias=bias, residual=on["z"], activation=activation
    )
    dz = grads[3] if on["z"] is not None else None
    return {
        "y": device.get(y),
        "dx": device.get(grads[0]),
        "dz": device.get(dz),
        "dweight": device.get(grads[1]),
        "dbias": device.get(grads[2]),
        "running_mean": device.get(on["running_mean"]),
        "running_var": device.get(on["running_var"]),
    }


def assert_same_pattern(ours, truth, dtype, what):
    """NaN where ``truth`` has NaN, inf of the same sign where it has inf, finite values close."""
    if truth is None:
        assert ours is None, what
        return
    assert ours is not None, what
    ours = np.asarray(ours, np.float64)
    assert ours.shape == truth.shape, what
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        wrong = np.argwhere(test(ours) != test(truth))
        assert wrong.size == 0, (
            f"{what}: {name} pattern differs at {wrong.tolist()[:6]}: ours "
            f"{[ours[tuple(i)] for i in wrong[:6]]} vs torch {[truth[tuple(i)] for i in wrong[:6]]}"
        )
    finite = np.isfinite(truth)
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    np.testing.assert_allclose(ours[finite], truth[finite], rtol=rtol, atol=atol, err_msg=what)


def _unfolded_output(arrays, training):
    """``(x - mean) * (weight * invstd) + bias (+ z)`` in float64: PyTorch CUDA's formula."""
    x = np.asarray(arrays["x"], np.float64)
    axes = (0, *range(2, x.ndim))
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = arrays["running_mean"], arrays["running_var"]
    per_channel = (1, -1) + (1,) * (x.ndim - 2)

    def channel(v):
        return np.asarray(v, np.float64).reshape(per_channel)

    with np.errstate(invalid="ignore"):
        scale = channel(arrays["weight"]) / np.sqrt(channel(var) + EPS)
        y = (x - channel(mean)) * scale + channel(arrays["bias"])
        if arrays["z"] is not None:
            y = y + np.asarray(arrays["z"], np.float64)
    return y


def _check(arrays, training, affine, relu, device, dtype, scenario):
    truth = _torch_truth(arrays, training, affine, relu)
    if scenario == "weight_inf":
        if relu:
            pytest.skip("PyTorch's CPU and CUDA outputs differ for an infinite weight")
        truth["y"] = _unfolded_output(arrays, training)
    ours = _ours(arrays, training, affine, relu, device)
    for key, expected in truth.items():
        assert_same_pattern(ours[key], expected, dtype, key)


SHAPE = (3, 4, 2, 2)


@pytest.mark.parametrize("epilogue", ["plain", "relu", "residual_relu"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_pattern_matches_pytorch(rng, device, scenario, mode, epilogue):
    """Planar float64, every scenario through every mode and epilogue."""
    training, affine = MODES[mode]
    if not affine and scenario in ("weight_nan", "weight_inf", "bias"):
        pytest.skip("no affine parameters")
    with_residual, relu = EPILOGUES[epilogue]
    arrays = _inputs(rng, SHAPE, "contiguous", np.float64, scenario, with_residual)
    _check(arrays, training, affine, relu, device, np.float64, scenario)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("device", ["cuda"], indirect=True)
def test_cuda_quick(rng, device, scenario, mode):
    """The CUDA kernels on every scenario, planar float64 with a residual and a ReLU."""
    training, affine = MODES[mode]
    arrays = _inputs(rng, SHAPE, "contiguous", np.float64, scenario, True)
    _check(arrays, training, affine, scenario != "weight_inf", device, np.float64, scenario)


@pytest.mark.parametrize("epilogue", ["plain", "residual", "residual_relu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_float32_channels_last(rng, device, scenario, mode, epilogue):
    """Channels-last float32: the channels-inner kernels and float32 rounding."""
    training, affine = MODES[mode]
    with_residual, relu = EPILOGUES[epilogue]
    arrays = _inputs(rng, SHAPE, "channels_last", np.float32, scenario, with_residual)
    _check(arrays, training, affine, relu, device, np.float32, scenario)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scenario", ["x_inf", "residual", "dy", "weight_nan"])
def test_threaded_cpu_path(rng, scenario, mode, layout):
    """Tensors of 128 Ki elements and more take the threaded CPU kernels."""
    from numbabn._cpu import backend

    shape = (3, 4, 104, 106)
    assert np.prod(shape) >= backend.PARALLEL_MIN_ELEMENTS
    training, affine = MODES[mode]
    arrays = _inputs(rng, shape, layout, np.float64, scenario, True, index_scale=37)
    _check(arrays, training, affine, True, CPU, np.float64, scenario)
    arrays["z"] = None
    _check(arrays, training, affine, False, CPU, np.float64, scenario)


@pytest.mark.parametrize("epilogue", ["plain", "residual_relu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bfloat16", "float16"])
def test_half_types(rng, dtype, scenario, mode, epilogue):
    """bfloat16 and float16 channels-last data into float32 parameters, as mixed precision
    has them: the pattern of PyTorch's own computation in the half type."""
    training, affine = MODES[mode]
    with_residual, relu = EPILOGUES[epilogue]
    arrays = _inputs(
        rng, SHAPE, "channels_last", dtype, scenario, with_residual, param_dtype=np.float32
    )
    _check(arrays, training, affine, relu, CPU, dtype, scenario)
