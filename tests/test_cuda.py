"""The CUDA backend against ``reference.py`` and the CPU backend.

Runs under Numba's CUDA simulator by default (tiny shapes, block sizes patched
small so that several blocks, chunks and ragged channel groups run), and on a
real GPU with ``make test-gpu`` (``NUMBA_ENABLE_CUDASIM=0``), which also tries
CuPy / PyTorch CUDA arrays when those are installed. ``test_real_sizes`` keeps
the real block sizes and grids: large shapes on a GPU, a tiny one in the simulator.
"""

from __future__ import annotations

import importlib.metadata
import math
import re

import numpy as np
import pytest
import reference as ref
from conftest import make_input, random_vector, tolerances

pytest.importorskip("numba_cuda")

from device import SIMULATOR, host, to_device  # noqa: E402
from numba import cuda  # noqa: E402

import numbabn  # noqa: E402
from numbabn import _dispatch, _tunables  # noqa: E402
from numbabn import functional as F  # noqa: E402
from numbabn._cuda import arrays, kernels  # noqa: E402
from numbabn._cuda import backend as cuda_backend  # noqa: E402
from tools.bench.gpu_check import BENCH_CASES  # noqa: E402

# (shape, memory layout) pairs covering 1d/2d/3d input, channels-inner and planar
# views, slices, negative strides and a layout that needs more than one axis group.
CASES = [
    ((6, 3), "contiguous"),
    ((4, 3, 7), "negative"),
    ((3, 5, 4, 3), "contiguous"),
    ((3, 5, 4, 3), "channels_last"),
    ((3, 5, 4, 3), "crop"),
    ((2, 3, 2, 3, 4), "channel_slice"),
    ((2, 3, 2, 3, 4), "channels_last"),
    ((7, 9, 2, 1), "fortran"),
]


@pytest.fixture(autouse=True)
def _small_blocks(request):
    """Every test here runs with the simulator's small blocks, except the real-size one."""
    if request.function is not test_real_sizes:
        request.getfixturevalue("cuda_small_blocks")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "layout"), CASES)
def test_training_forward_backward(rng, shape, layout, dtype):
    x = make_input(rng, shape, layout, dtype, loc=100.0)
    dy = make_input(rng, shape, layout, dtype)
    c = shape[1]
    weight, bias = random_vector(rng, c, dtype), random_vector(rng, c, dtype, -0.5, 0.5)
    running_mean, running_var = np.zeros(c, dtype), np.ones(c, dtype)
    truth = ref.forward(x, weight, bias, running_mean, running_var, training=True, momentum=0.3)
    grads = ref.backward(dy, x, truth.mean, truth.invstd, weight)

    d_rm, d_rv = to_device(running_mean), to_device(running_var)
    d_x, d_w = to_device(x), to_device(weight)
    y, saved = F.batch_norm_forward(d_x, d_rm, d_rv, d_w, to_device(bias), True, 0.3)
    dx, dw, db = F.batch_norm_backward(to_device(dy), d_x, saved, d_w)

    tol = tolerances(dtype)
    np.testing.assert_allclose(host(y), truth.output, **tol)
    if layout in ("contiguous", "channels_last"):
        assert host(y).strides == x.strides
    np.testing.assert_allclose(host(saved.mean), truth.mean, rtol=1e-12)
    np.testing.assert_allclose(host(saved.invstd), truth.invstd, rtol=1e-9)
    np.testing.assert_allclose(host(d_rm), truth.running_mean, **tol)
    np.testing.assert_allclose(host(d_rv), truth.running_var, **tol)
    np.testing.assert_allclose(host(dx), grads.grad_input, **tol)
    np.testing.assert_allclose(host(dw), grads.grad_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(db), grads.grad_bias, rtol=1e-5, atol=1e-5)
    assert host(dw).dtype == np.dtype(dtype)


def test_grid_covers_ragged_blocks():
    """The patched sizes give several chunks and a partial channel group."""
    x = make_input(np.random.default_rng(0), (3, 5, 4, 3), "channels_last")
    grid = cuda_backend._grid_for(to_device(x))
    assert grid.family == kernels.Family.CHANNELS_INNER
    assert grid.n_chunks > 1
    if SIMULATOR:
        assert x.shape[1] % grid.channels_per_block != 0


@pytest.mark.parametrize(("n_channels", "channels_per_block"), [(2, 2), (3, 4), (9, 16), (40, 32)])
def test_narrow_channels_inner_blocks_pack_positions(n_channels, channels_per_block):
    """Channels-last data with fewer channels than CHANNELS_PER_BLOCK fills the warps with
    positions."""
    sizes = (256, 32, 2048, 4, 64, 8, 264, 8, 8)
    shape, strides = (
        (64, n_channels, 8, 8),
        (8 * 8 * n_channels * 4, 4, 8 * n_channels * 4, n_channels * 4),
    )
    grid = cuda_backend._grid(shape, strides, sizes)
    assert grid.family == kernels.Family.CHANNELS_INNER
    assert grid.channels_per_block == channels_per_block
    assert grid.n_groups == -(-n_channels // channels_per_block)


# Shapes of 1 MB and more whose rows are few and long, then the GPU benchmark's; float32,
# NCHW unless channels-last (True).
FILLING = [
    ((8, 3, 224, 224), False),
    ((8, 3, 224, 224), True),
    ((4, 3, 512, 512), False),
    ((1, 3, 2048, 2048), False),
    ((1, 3, 2048, 2048), True),
    ((1, 8, 10**6), False),
    ((1, 1, 10**8), False),
    ((32, 32, 56, 56), True),  # one group of 32 channels: the fewest blocks the merge allows
    *BENCH_CASES,
]


def _strides(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    """float32 strides, C order or channels-last."""
    order = [0, *range(2, len(shape)), 1] if channels_last else list(range(len(shape)))
    strides = [0] * len(shape)
    stride = 4
    for axis in reversed(order):
        strides[axis] = stride
        stride *= shape[axis]
    return tuple(strides)


REAL_GRID_SIZES = (
    _tunables.THREADS, _tunables.CHANNELS_PER_BLOCK, _tunables.TARGET_BLOCKS,
    _tunables.MIN_PER_THREAD, _tunables.MAX_PER_THREAD, _tunables.WIDE_ROW_THREADS,
    _tunables.MIN_GRID_BLOCKS, _tunables.MERGE_LOADS, _tunables.MAX_MERGE_ROUNDS,
)  # fmt: skip


@pytest.mark.parametrize(("shape", "channels_last"), FILLING)
def test_grids_of_a_megabyte_or_more_fill_an_h100(shape, channels_last):
    """Two blocks or more per multiprocessor of an H100 (132) for every tensor of 1 MB or
    more, at the real block sizes, whatever the shape."""
    grid = cuda_backend._grid(shape, _strides(shape, channels_last), REAL_GRID_SIZES)
    if math.prod(shape) * 4 >= 1 << 20:
        assert grid.blocks >= 2 * 132, grid
    assert grid.n_chunks * grid.per_block >= math.prod(shape) // shape[1]  # every value


# Beside those: channels-last batches of 8 and 32 times the benchmark's, and 2^31 values
# and more, where chunks of MAX_PER_THREAD values a thread would be thousands a channel.
MANY_CHUNKS = [
    ((256, 64, 56, 56), True),
    ((1024, 64, 56, 56), True),
    ((1, 2, 2**30 + 8), False),
    ((64, 1, 8192, 4096), False),
]


@pytest.mark.parametrize(("shape", "channels_last"), FILLING + MANY_CHUNKS)
def test_merges_of_partials_take_at_most_eight_rounds(shape, channels_last):
    """The last block's merge of a channel's partials: each thread loads MERGE_LOADS of
    them at a time, at most MAX_MERGE_ROUNDS = 8 times one after another (none with one
    chunk a channel)."""
    grid = cuda_backend._grid(shape, _strides(shape, channels_last), REAL_GRID_SIZES)
    merging_threads = _tunables.THREADS // grid.channels_per_block
    rounds = -(-grid.n_chunks // (merging_threads * _tunables.MERGE_LOADS))
    assert grid.merge_rounds == (rounds if grid.n_chunks > 1 else 0)
    assert grid.merge_rounds <= _tunables.MAX_MERGE_ROUNDS == 8, grid
    assert grid.n_chunks * grid.per_block >= math.prod(shape) // shape[1]  # every value


@pytest.mark.parametrize("activation", [None, "relu"])
def test_wide_rows_are_walked_row_by_row(rng, activation):
    """Rows of many values (wide feature maps) take whole rows a block, walked one by one."""
    shape = (3, 2, 10, 14)  # 140 values a row: wide for the simulator's 16-thread blocks
    x = make_input(rng, shape, "contiguous", np.float64, loc=50.0)
    dy = make_input(rng, shape, "contiguous", np.float64)
    z = make_input(rng, shape, "contiguous", np.float64) if activation else None
    grid = cuda_backend._grid_for(to_device(x))
    if SIMULATOR:
        assert grid.family == kernels.Family.WIDE_ROWS and grid.n_chunks > 1
    bn = numbabn.BatchNorm2d(2, dtype=np.float64, device="cuda", activation=activation)
    reference = numbabn.BatchNorm2d(2, dtype=np.float64, activation=activation)
    for training in (True, False):
        bn.train(training)
        reference.train(training)
        residual = None if z is None else to_device(z)
        y = bn(to_device(x), residual=residual)
        grads = bn.backward(to_device(dy))
        expected = reference(x, residual=z)
        expected_grads = reference.backward(dy)
        np.testing.assert_allclose(host(y), expected, rtol=1e-10, atol=1e-10)
        if activation:
            for got, want in zip(grads, expected_grads, strict=True):
                np.testing.assert_allclose(host(got), want, rtol=1e-10, atol=1e-10)
        else:
            np.testing.assert_allclose(host(grads), expected_grads, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(host(bn.running_mean), reference.running_mean, rtol=1e-12)
    np.testing.assert_allclose(host(bn.grads["weight"]), reference.grads["weight"], rtol=1e-9)


def test_float16_input_with_float32_parameters(rng):
    x = make_input(rng, (4, 3, 6), "contiguous", np.float16, loc=10.0)
    dy = make_input(rng, (4, 3, 6), "contiguous", np.float16)
    bn = numbabn.BatchNorm1d(3, device="cuda")
    y = bn(to_device(x))
    truth = ref.forward(x.astype(np.float64), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
    assert host(y).dtype == np.float16
    np.testing.assert_allclose(host(y), truth.output, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(host(bn.running_mean), truth.running_mean, rtol=1e-6)
    grads = ref.backward(dy.astype(np.float64), x.astype(np.float64), truth.mean, truth.invstd)
    dx = bn.backward(to_device(dy))
    assert host(dx).dtype == np.float16
    np.testing.assert_allclose(host(dx), grads.grad_input, rtol=5e-3, atol=5e-3)
    assert host(bn.grads["weight"]).dtype == np.float32


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"bias": False, "dtype": np.float64},
    ],
    ids=["default", "momentum_none", "no_affine", "no_tracking", "no_bias"],
)
def test_module_sequence_matches_cpu(rng, options):
    """train -> eval -> train, with backward after each, as the CPU module does it."""
    on_cpu = numbabn.BatchNorm2d(3, **options)
    on_gpu = numbabn.BatchNorm2d(3, device="cuda", **options)
    dtype = on_cpu.dtype
    for step, training in enumerate([True, True, False, True]):
        on_cpu.train(training)
        on_gpu.train(training)
        x = make_input(rng, (2, 3, 3, 2), "channels_last" if step % 2 else "contiguous", dtype)
        dy = make_input(rng, (2, 3, 3, 2), "contiguous", dtype)
        tol = tolerances(dtype)
        np.testing.assert_allclose(host(on_gpu(to_device(x))), on_cpu(x), **tol)
        np.testing.assert_allclose(host(on_gpu.backward(to_device(dy))), on_cpu.backward(dy), **tol)
        gpu_state, cpu_state = on_gpu.state_dict(), on_cpu.state_dict()
        assert gpu_state.keys() == cpu_state.keys()
        for key, value in cpu_state.items():
            assert isinstance(gpu_state[key], np.ndarray)
            np.testing.assert_allclose(gpu_state[key], value, **tol)
        for name, grad in on_cpu.grads.items():
            np.testing.assert_allclose(host(on_gpu.grads[name]), grad, rtol=1e-5, atol=1e-5)


def test_results_repeat_bit_for_bit(rng):
    x = to_device(make_input(rng, (5, 6, 3, 2), "channels_last", np.float32))
    first = host(F.batch_norm(x, None, None, training=True))
    second = host(F.batch_norm(x, None, None, training=True))
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize(
    ("shape", "layout", "most_rounds"),
    [((50, 3, 2, 2), "channels_last", 8), ((50, 3, 2, 2), "channels_last", 1),
     ((11, 1, 100), "contiguous", 1)],
)  # fmt: skip
def test_merge_of_many_chunks_a_channel(rng, monkeypatch, shape, layout, most_rounds):
    """Dozens of chunks a channel: the merge takes several rounds of loads, the last one
    partial; limited to one round, the grid takes more values a thread than MAX_PER_THREAD."""
    monkeypatch.setattr(cuda_backend, "MAX_MERGE_ROUNDS", most_rounds)
    x = make_input(rng, shape, layout, np.float64, loc=5.0)
    dy = make_input(rng, shape, layout, np.float64)
    d_x = to_device(x)
    grid = cuda_backend._grid_for(d_x)
    merging_threads = kernels.THREADS // grid.channels_per_block
    assert grid.n_chunks > merging_threads * kernels.MERGE_LOADS or most_rounds == 1
    assert 1 <= grid.merge_rounds <= most_rounds
    if most_rounds == 1:
        assert grid.per_block > merging_threads * cuda_backend.MAX_PER_THREAD
    y, saved = F.batch_norm_forward(d_x, None, None, None, None, True)
    dx, _, _ = F.batch_norm_backward(to_device(dy), d_x, saved, None)
    truth = ref.forward(x)
    np.testing.assert_allclose(host(y), truth.output, rtol=1e-10, atol=1e-10)
    grads = ref.backward(dy, x, truth.mean, truth.invstd)
    np.testing.assert_allclose(host(dx), grads.grad_input, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_counter_left_wrong_is_reset_before_the_next_reduction(rng, layout):
    """An aborted launch, or two launches overlapping on one scratch, can leave a merge
    counter anywhere: the next call of that shape still merges only its own partials."""
    shape = (5, 3, 4, 3)
    first = make_input(rng, shape, layout, np.float64, loc=10.0)
    x = make_input(rng, shape, layout, np.float64, loc=-30.0, scale=3.0)
    dy = make_input(rng, shape, layout, np.float64)
    on_device = to_device(first)
    F.batch_norm(on_device, None, None, training=True)  # the scratch now holds first's partials
    grid = cuda_backend._grid_for(on_device)
    assert grid.n_chunks > 1
    scratch = cuda_backend._scratch(
        arrays.queue_key(), grid.partials_shape(shape[1]), grid.n_groups, shape[1]
    )

    def corrupt() -> None:  # as if every block but one had finished already
        scratch.counters.copy_to_device(np.full(grid.n_groups, grid.n_chunks - 1, np.uint32))

    corrupt()
    y, saved = F.batch_norm_forward(to_device(x), None, None, None, None, True)
    truth = ref.forward(x)
    np.testing.assert_allclose(host(y), truth.output, rtol=1e-10, atol=1e-10)
    corrupt()
    dx, _, _ = F.batch_norm_backward(to_device(dy), to_device(x), saved, None)
    grads = ref.backward(dy, x, truth.mean, truth.invstd)
    np.testing.assert_allclose(host(dx), grads.grad_input, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", list(kernels.Family))
def test_data_kernels_do_nothing_for_empty_input(family):
    """A launch over an input without values (a caller past the host's guard) writes
    nothing and divides by nothing."""
    empty = to_device(np.zeros((0, 3, 1, 4)))
    vector = to_device(np.full(3, 7.0))
    coeffs = to_device(np.full((kernels.COEFFICIENT_ROWS, 3), 7.0))
    partials, counters = to_device(np.zeros((3, 1, 2))), to_device(np.zeros(3, np.uint32))
    launch = arrays.configured  # one block per channel, as the grid of an empty input
    threads = kernels.THREADS
    launch(kernels.statistics(family), 3, threads)(
        1, 1, empty, vector, vector, vector, vector, True, 0.1, 1e-5, coeffs, partials, counters
    )
    launch(kernels.gradient_sums(family, False, False), 3, threads)(
        1, 1, empty, empty, empty, vector, vector, vector, vector, True, coeffs,
        to_device(np.zeros((2, 3))), partials, counters, empty,
    )  # fmt: skip
    launch(kernels.elementwise(family, kernels.Mode.AFFINE, False, False), 3, threads)(
        1, 1, empty, empty, empty, coeffs, empty
    )
    launch(kernels.evaluation(family, False, False), 3, threads)(
        1, 1, empty, empty, vector, vector, vector, vector, 1e-5, coeffs, empty
    )
    assert host(coeffs).tolist() == np.full((kernels.COEFFICIENT_ROWS, 3), 7.0).tolist()
    assert host(vector).tolist() == [7.0] * 3


def test_out_and_empty_batch(rng):
    x = make_input(rng, (3, 4, 5), "contiguous", np.float32)
    out = to_device(np.zeros_like(x))
    result = F.batch_norm(to_device(x), None, None, training=True, out=out)
    assert result is out
    np.testing.assert_allclose(host(out), ref.forward(x).output, **tolerances(np.float32))
    bn = numbabn.BatchNorm1d(4, device="cuda")
    empty = bn(to_device(np.zeros((0, 4, 5), np.float32)))
    assert empty.shape == (0, 4, 5)
    assert host(bn.running_mean).tolist() == [0.0] * 4
    assert int(bn.num_batches_tracked) == 1


def test_state_moves_between_devices_and_pytorch(rng):
    torch = pytest.importorskip("torch")
    bn = numbabn.BatchNorm2d(3)
    bn(make_input(rng, (4, 3, 2, 2)).astype(np.float32))
    state = bn.state_dict()
    bn.to("cuda")
    assert bn.device == "cuda"
    assert arrays.devicearray.is_cuda_ndarray(bn.running_mean)
    for key, value in bn.state_dict().items():
        assert value.tobytes() == state[key].tobytes(), key
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
    on_gpu = numbabn.BatchNorm2d(3, device="cuda")
    on_gpu.load_state_dict({key: value.numpy() for key, value in theirs.state_dict().items()})
    np.testing.assert_array_equal(host(on_gpu.running_var), state["running_var"])
    bn.cpu()
    assert isinstance(bn.weight, np.ndarray)
    assert bn.state_dict()["running_mean"].tobytes() == state["running_mean"].tobytes()


def test_lazy_module_on_cuda(rng):
    bn = numbabn.LazyBatchNorm2d(device="cuda")
    y = bn(to_device(make_input(rng, (2, 5, 3, 3), dtype=np.float32)))
    assert isinstance(bn, numbabn.BatchNorm2d)
    assert bn.num_features == 5
    assert host(y).shape == (2, 5, 3, 3)


def _state(module) -> dict:
    return {key: value.tobytes() for key, value in module.state_dict().items()} | {
        "grads": {k: None if v is None else host(v).tobytes() for k, v in module.grads.items()}
    }


@pytest.mark.parametrize(
    ("make_call", "exc", "match"),
    [
        (lambda bn, rng: bn(to_device(np.zeros((2, 3, 4), np.float32))), ValueError, "expected 4D"),
        (
            lambda bn, rng: bn(to_device(np.zeros((1, 3, 1, 1), np.float32))),
            ValueError,
            "Expected more than 1 value per channel when training",
        ),
        (
            lambda bn, rng: bn(to_device(np.zeros((2, 4, 2, 2), np.float32))),
            RuntimeError,
            "running_mean should contain 4 elements not 3",
        ),
        (
            lambda bn, rng: bn(to_device(np.zeros((2, 3, 2, 2), np.float64))),
            RuntimeError,
            re.escape("mixed dtype (CPU): all inputs must share same datatype."),
        ),
        (
            lambda bn, rng: bn(np.zeros((2, 3, 2, 2), np.float32)),
            TypeError,
            "BatchNorm2d is on cuda but the input is a cpu array",
        ),
        (
            lambda bn, rng: bn(to_device(np.zeros((2, 3, 2, 2), np.int32))),
            NotImplementedError,
            "\"batch_norm\" not implemented for 'Int'",
        ),
    ],
    ids=["ndim", "one_value", "channels", "dtype", "host_input", "int_dtype"],
)
def test_errors_change_nothing(rng, make_call, exc, match):
    bn = numbabn.BatchNorm2d(3, device="cuda")
    bn(to_device(make_input(rng, (2, 3, 2, 2), dtype=np.float32)))
    bn.backward(to_device(make_input(rng, (2, 3, 2, 2), dtype=np.float32)))
    before = _state(bn)
    with pytest.raises(exc, match=match):
        make_call(bn, rng)
    assert _state(bn) == before


def test_mixing_host_and_device_arrays_names_both():
    x = to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="input is a cuda array but weight is a cpu array"):
        F.batch_norm(x, None, None, np.ones(3, np.float32), training=True)


@pytest.mark.parametrize(("package", "found"), [("numba-cuda", "0.19.1"), ("numba", "0.59.1")])
def test_older_numba_or_numba_cuda_is_named_when_a_cuda_array_arrives(monkeypatch, package, found):
    installed = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: found if name == package else installed(name)
    )
    minimum = _dispatch.CUDA_REQUIREMENTS[package]
    expected = re.escape(f"{package} {found} (numbabn needs {package} >= {minimum})")
    with pytest.raises(ImportError, match=expected):
        _dispatch.cuda_backend.__wrapped__()  # what the first CUDA array's call runs
    monkeypatch.undo()
    _dispatch.cuda_backend.__wrapped__()  # the installed ones pass


@pytest.mark.skipif(SIMULATOR, reason="CuPy and PyTorch CUDA arrays need a real GPU")
@pytest.mark.parametrize("library", ["cupy", "torch"])
def test_foreign_arrays_in_and_out(rng, library):
    """CuPy in, CuPy out; PyTorch CUDA tensors likewise, without copies to the host."""
    module = pytest.importorskip(library)
    x = make_input(rng, (4, 3, 5, 5), "channels_last", np.float32)
    if library == "cupy":
        device_x = module.asarray(x)
        to_numpy = module.asnumpy
    else:
        if not module.cuda.is_available():
            pytest.skip("this PyTorch has no CUDA")
        device_x = module.from_numpy(x).cuda()
        to_numpy = lambda t: t.cpu().numpy()  # noqa: E731
    bn = numbabn.BatchNorm2d(3, device="cuda")
    y = bn(device_x)
    assert type(y) is type(device_x)
    np.testing.assert_allclose(to_numpy(y), ref.forward(x).output, **tolerances(np.float32))
    dx = bn.backward(y)
    assert type(dx) is type(device_x)


# The real block sizes and grids: shapes of many blocks on a GPU, one tiny shape (both
# kernel families, a block of 256 threads each) in the simulator.
REAL_SIZES = (
    [(2, 3, 4, 3)]
    if SIMULATOR
    else [(32, 64, 28, 28), (64, 256, 7, 7), (8, 3, 224, 224), (4096, 100)]
)


@pytest.mark.parametrize("shape", REAL_SIZES)
def test_real_sizes(rng, shape):
    x = make_input(rng, shape, "contiguous", np.float32, loc=1000.0)
    truth = ref.forward(x)
    y = host(F.batch_norm(to_device(x), None, None, training=True))
    np.testing.assert_allclose(y, truth.output, rtol=1e-5, atol=1e-5)
    x_cl = make_input(rng, shape, "channels_last" if len(shape) == 4 else "contiguous")
    y_cl = host(F.batch_norm(to_device(x_cl), None, None, training=True))
    np.testing.assert_allclose(y_cl, ref.forward(x_cl).output, rtol=1e-9, atol=1e-9)


# 2^31 + 2^20 float32 values (8.6 GB), two channels: offsets past 2^31 elements in both.
HUGE_SHAPE = (1, 2, 2**30 + 2**19)


@pytest.mark.skipif(SIMULATOR, reason="8.6 GB of device memory")
def test_more_than_two_to_the_31_values():
    """A training forward and backward of a tensor of more than 2^31 values: its statistics
    and last values are those of the pattern it holds."""
    free, _ = cuda.current_context().get_memory_info()
    if free < 3 * 4 * math.prod(HUGE_SHAPE):
        pytest.skip("not enough free device memory")

    @cuda.jit
    def fill(x):  # channel c holds c, c + 1, c + 2, c + 3, c, ... (period 4)
        i = cuda.grid(1)
        for k in range(i, x.shape[2], cuda.gridsize(1)):
            x[0, 0, k] = k % 4
            x[0, 1, k] = 1 + k % 4

    x = cuda.device_array(HUGE_SHAPE, np.float32)
    fill[1024, 256](x)
    y, saved = F.batch_norm_forward(x, None, None, training=True)
    # mean 1.5 and 2.5, biased variance 1.25: x - mean over sqrt(1.25 + eps)
    np.testing.assert_allclose(host(saved.mean), [1.5, 2.5], rtol=1e-12)
    invstd = 1 / math.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(host(saved.invstd), [invstd, invstd], rtol=1e-12)
    n = HUGE_SHAPE[2]
    tail = host(y[:, :, n - 4 :])  # positions n-4..n-1: k % 4 = 0, 1, 2, 3
    expected = (np.arange(4) - 1.5) * invstd
    np.testing.assert_allclose(tail, np.broadcast_to(expected, tail.shape), rtol=1e-6)
    # dy = y, the gradient of sum(y^2) / 2: dx = invstd * y * eps / (1.25 + eps), about 1e-5
    dx, _, _ = F.batch_norm_backward(y, x, saved, None)
    assert np.abs(host(dx[:, :, n - 4 :])).max() < 1e-4


def test_statistics_from_the_gpu_cannot_differentiate_host_arrays(rng):
    x = make_input(rng, (4, 3, 5), "contiguous", np.float32)
    _, saved = F.batch_norm_forward(to_device(x), None, None, training=True)
    with pytest.raises(TypeError, match="saved_mean is a cuda array"):
        F.batch_norm_backward(np.ones_like(x), x, saved)
