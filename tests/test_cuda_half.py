"""bfloat16 and float16 device arrays on the CUDA backend: PyTorch's dtype rules, and every
16-bit result within one unit in the last place of the CPU backend's (itself within one of
the exact result: tests/test_half.py).

Runs under Numba's CUDA simulator by default, on tiny shapes with the small blocks of
``cuda_small_blocks`` (several chunks and ragged channel groups), and on a GPU with
``make test-gpu``, where PyTorch CUDA tensors are tried too.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_input

pytest.importorskip("numba_cuda")
ml_dtypes = pytest.importorskip("ml_dtypes")

from device import SIMULATOR, host, to_device  # noqa: E402
from numba import cuda, float64  # noqa: E402

import numbabn  # noqa: E402
from numbabn import functional as F  # noqa: E402
from numbabn._cuda.halves import narrowed  # noqa: E402

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
HALVES = pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16], ids=["bfloat16", "float16"])
FLOAT32 = np.dtype(np.float32)


@pytest.fixture(autouse=True)
def _small_blocks(cuda_small_blocks):
    """Every test here runs with the simulator's small blocks."""


def assert_within_one_ulp(ours: np.ndarray, theirs: np.ndarray) -> None:
    """``ours`` has ``theirs``' dtype, NaN and infinities, and each value is ``theirs`` or
    one of its neighbours in that dtype."""
    assert ours.dtype == theirs.dtype
    up = np.nextafter(theirs, np.array(np.inf, theirs.dtype))
    down = np.nextafter(theirs, np.array(-np.inf, theirs.dtype))
    nan = np.isnan(theirs)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    near = (ours == theirs) | (ours == up) | (ours == down) | nan
    assert near.all(), f"{ours[~near]} where the CPU gives {theirs[~near]}"


def assert_same_state(on_gpu, on_cpu, dtype: np.dtype) -> None:
    """The modules' state and parameter gradients agree, all of ``dtype``: 16-bit ones to
    1 ulp, float32 ones to float32 rounding."""
    expected = _state(on_cpu)
    for key, value in _state(on_gpu).items():
        if key == "num_batches_tracked":
            assert value == expected[key]
        elif dtype == FLOAT32:
            assert value.dtype == dtype, key
            np.testing.assert_allclose(value, expected[key], rtol=2e-6, atol=1e-6)
        else:
            assert_within_one_ulp(value, expected[key])


def _state(module) -> dict[str, np.ndarray]:
    """A module's state and parameter gradients, on the host."""
    grads = {f"grad {name}": grad for name, grad in module.grads.items() if grad is not None}
    fetched = {name: grad if isinstance(grad, np.ndarray) else host(grad)
               for name, grad in grads.items()}  # fmt: skip
    return module.state_dict() | fetched


def _modules(dtype: np.dtype, converted: bool, **options) -> tuple:
    """The same module on the CPU and on the GPU: float32, or converted to ``dtype``."""
    on_cpu = numbabn.BatchNorm2d(3, **options)
    on_gpu = numbabn.BatchNorm2d(3, device="cuda", **options)
    if converted:
        on_cpu = on_cpu.bfloat16() if dtype == BFLOAT16 else on_cpu.half()
        on_gpu = on_gpu.to(dtype=dtype)
    return on_cpu, on_gpu


@HALVES
@pytest.mark.parametrize(
    ("layout", "converted"),
    [("contiguous", False), ("channels_last", False), ("crop", True)],
    ids=["float32 module", "float32 module, channels-last", "converted module, cropped"],
)
def test_train_and_eval_steps_match_the_cpu(dtype, layout, converted, rng):
    """Half data, half outputs and input gradients; state and parameter gradients float32
    (a float32 module) or of the data's dtype (a converted one), as PyTorch's. The second
    step's parameter gradients add to the first's (no zero_grad between)."""
    on_cpu, on_gpu = _modules(dtype, converted)
    state_dtype = dtype if converted else FLOAT32
    for training in (True, False):
        on_cpu.train(training)
        on_gpu.train(training)
        x = make_input(rng, (3, 3, 4, 3), layout, dtype, loc=5.0, scale=2.0)
        dy = make_input(rng, (3, 3, 4, 3), layout, dtype)
        y = host(on_gpu(to_device(x)))
        assert_within_one_ulp(y, on_cpu(x))
        assert_within_one_ulp(host(on_gpu.backward(to_device(dy))), on_cpu.backward(dy))
        assert_same_state(on_gpu, on_cpu, state_dtype)


@HALVES
def test_fused_relu_and_residual_into_out(dtype, rng):
    shape = (3, 3, 4, 3)
    on_cpu, on_gpu = _modules(dtype, False, activation="relu")
    x, z, dy = (make_input(rng, shape, "channels_last", dtype) for _ in range(3))
    out = to_device(np.empty(shape, dtype))
    assert on_gpu(to_device(x), out, residual=to_device(z)) is out
    assert_within_one_ulp(host(out), on_cpu(x, residual=z))
    (dx, dz), (dx_cpu, dz_cpu) = on_gpu.backward(to_device(dy)), on_cpu.backward(dy)
    assert_within_one_ulp(host(dx), dx_cpu)
    assert_within_one_ulp(host(dz), dz_cpu)


@HALVES
def test_fused_relu_of_values_that_round_to_zero_as_the_cpu(dtype):
    """A pre-activation that rounds to zero in the half type: the ReLU's output sign and its
    gradient mask are the CPU's (PyTorch's: its ReLU runs on the rounded value)."""
    tiny, above = (2.0**-140, 1.5 * 2.0**-134) if dtype == BFLOAT16 else (1e-9, 4e-8)
    # x and the mean are 0, so the pre-activation is the bias: +-tiny rounds to +-0.
    bias = np.array([tiny, -tiny, above, -above], np.float32)
    x, dy = np.zeros((2, 4, 3), dtype), np.ones((2, 4, 3), dtype)
    mean, var, weight = np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(4, np.float32)
    results = []
    for move in (lambda array: array, to_device):
        args = [move(array) for array in (mean, var, weight, bias)]
        y, saved = F.batch_norm_forward(move(x), *args, training=False, activation="relu")
        dx = F.batch_norm_backward(
            move(dy), move(x), saved, args[2], bias=args[3], activation="relu"
        )[0]
        on_gpu = move is to_device
        results.append((host(y) if on_gpu else y, host(dx) if on_gpu else dx))
    (y_cpu, dx_cpu), (y_gpu, dx_gpu) = results
    bits = np.dtype(f"u{dtype.itemsize}")
    np.testing.assert_array_equal(y_gpu.view(bits), y_cpu.view(bits))
    np.testing.assert_array_equal(dx_gpu != 0, dx_cpu != 0)
    assert np.signbit(y_cpu.astype(np.float32)[:, 1]).all()  # what the case is about


@HALVES
@pytest.mark.parametrize("converted", [False, True], ids=["float32 module", "converted module"])
def test_channel_stats_and_sync_batch_norm_match_the_cpu(dtype, converted, rng):
    """The separate phases (statistics, coefficients, affine pass, gradient sums) that
    ``SyncBatchNorm`` exchanges between, on one rank."""
    mpi = pytest.importorskip("mpi4py.MPI")
    x = make_input(rng, (4, 3, 5), "contiguous", dtype, loc=2.0, scale=3.0)
    dy = make_input(rng, (4, 3, 5), "contiguous", dtype)
    stats = numbabn.ChannelStats(3).update(to_device(x))
    np.testing.assert_array_equal(stats.mean, numbabn.ChannelStats(3).update(x).mean)
    on_cpu = numbabn.SyncBatchNorm(3, comm=mpi.COMM_SELF)
    on_gpu = numbabn.SyncBatchNorm(3, comm=mpi.COMM_SELF, device="cuda")
    if converted:
        on_cpu, on_gpu = on_cpu.to(dtype=dtype), on_gpu.to(dtype=dtype)
    assert_within_one_ulp(host(on_gpu(to_device(x))), on_cpu(x))
    assert_within_one_ulp(host(on_gpu.backward(to_device(dy))), on_cpu.backward(dy))
    assert_same_state(on_gpu, on_cpu, dtype if converted else FLOAT32)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the simulator's NumPy
@HALVES
def test_nonfinite_values_and_overflow_as_the_cpu(dtype, rng):
    """NaN and infinities in the input give the CPU's NaN and infinities; a float16 output
    beyond its range is an infinity of its sign, as PyTorch's."""
    x = make_input(rng, (6, 4, 3), "contiguous", dtype)
    x[0, 1, 0] = np.nan
    x[1, 2, 2] = np.inf
    x[2, 3, 1], x[3, 3, 1] = np.inf, -np.inf
    weight = np.ones(4, np.float32)
    weight[0] = 1e5  # float16 outputs beyond 65504
    running = [(np.zeros(4, np.float32), np.ones(4, np.float32)) for _ in range(2)]
    gpu_running = [to_device(vector) for vector in running[1]]
    expected = F.batch_norm(x, *running[0], weight, training=True)
    y = host(F.batch_norm(to_device(x), *gpu_running, to_device(weight), training=True))
    assert_within_one_ulp(y, expected)
    if dtype == FLOAT16:
        assert np.isinf(y[:, 0]).any()
    for ours, theirs in zip(gpu_running, running[0], strict=True):
        np.testing.assert_array_equal(np.isnan(host(ours)), np.isnan(theirs))


@HALVES
def test_dtype_rules_as_pytorch(dtype, rng):
    x = to_device(make_input(rng, (4, 3), "contiguous", dtype))
    with pytest.raises(RuntimeError, match="expect parameter to have scalar type of Float"):
        F.batch_norm(x, to_device(np.zeros(3)), to_device(np.ones(3)), training=True)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        numbabn.BatchNorm1d(3, dtype=np.float64, device="cuda")(x)
    y, saved = F.batch_norm_forward(x, None, None, training=True)
    assert y.dtype == dtype
    weight = to_device(np.ones(3, dtype))
    dx, dweight, dbias = F.batch_norm_backward(x, x, saved, weight)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype


@HALVES
def test_results_repeat_bit_for_bit(dtype, rng):
    x = to_device(make_input(rng, (5, 3, 4, 3), "negative", dtype))
    first = host(F.batch_norm(x, None, None, training=True))
    assert host(F.batch_norm(x, None, None, training=True)).tobytes() == first.tobytes()


@pytest.mark.skipif(SIMULATOR, reason="PyTorch CUDA tensors need a real GPU")
@HALVES
def test_pytorch_cuda_tensors_in_and_out(dtype, rng):
    """bfloat16 tensors, which PyTorch exports as raw 2-byte values, and float16 ones come
    back as tensors of their dtype over the same memory."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch has no CUDA")
    kind = torch.bfloat16 if dtype == BFLOAT16 else torch.float16
    x = make_input(rng, (4, 3, 5), "contiguous", dtype)
    x_t = torch.from_numpy(x.view(np.int16)).view(kind).cuda()
    out_t = torch.empty_like(x_t)
    assert F.batch_norm(x_t, None, None, training=True, out=out_t) is out_t
    fresh = F.batch_norm(x_t, None, None, training=True)
    assert isinstance(fresh, torch.Tensor) and fresh.dtype == kind and fresh.is_cuda
    assert torch.equal(fresh, out_t)
    ours = out_t.cpu().view(torch.int16).numpy().view(dtype)
    assert_within_one_ulp(ours, F.batch_norm(x, None, None, training=True))


@pytest.mark.filterwarnings("ignore:.*overflow encountered in cast:RuntimeWarning")
@HALVES
def test_kernels_round_float64_once_and_widen_exactly(dtype):
    """A kernel's store through ``narrowed`` is NumPy's (ml_dtypes') single rounding to
    nearest even, where a float32 on the way would round some values twice; its load of a
    16-bit value as float64 is exact. (Under the simulator NumPy stores; a GPU runs the
    compiled rounding.)"""

    @cuda.jit
    def store_and_load(values, out, back):
        for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            out[i] = narrowed(values[i], out)
            back[i] = float64(out[i])

    rng = np.random.default_rng(11)
    half_ulp = 2.0 ** -(8 if dtype == BFLOAT16 else 11)  # of 1.0
    values = np.concatenate([
        rng.standard_normal(3000) * 10.0 ** rng.integers(-45, 40, 3000),
        1.0 + half_ulp * np.array([1.0, 3.0]) + 2.0**-40,  # past a tie: rounded up once
        1.0 + half_ulp * np.array([1.0, 3.0]) - 2.0**-40,
        (np.arange(1, 60) + 0.5) * 2.0 ** (-133 if dtype == BFLOAT16 else -24),  # subnormals
        [np.inf, np.nan, 0.0, 65519.99, 65520.0, 3.4e38, 3.4e39, 1e300, 2.0**-300],
    ])  # fmt: skip
    values = np.concatenate([values, -values])
    out = to_device(np.zeros(values.size, dtype))
    back = to_device(np.zeros(values.size))
    store_and_load[4, 32](to_device(values), out, back)
    with np.errstate(over="ignore"):
        expected = values.astype(dtype)
    got = host(out)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(host(back), got.astype(np.float64))
