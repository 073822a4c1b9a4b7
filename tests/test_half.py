"""bfloat16 and float16 data on the CPU: PyTorch's dtype rules, results within one unit in
the last place of the exact ones, and never further from them than PyTorch's own.

"Exact" is :mod:`reference` (float64) on the very half inputs, rounded once to the
half type. A few representative shapes per type: the float32 and float64 matrix
elsewhere runs the same kernels, which differ only in how they load and store.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import reference
from conftest import from_torch, layouts_for, make_input, to_torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numbabn
from numbabn import functional as F
from numbabn._cpu import host_arrays

ml_dtypes = pytest.importorskip("ml_dtypes")
torch = pytest.importorskip("torch")

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
HALVES = pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16], ids=["bfloat16", "float16"])
TORCH = {BFLOAT16: torch.bfloat16, FLOAT16: torch.float16}
# Layouts that take each kernel family and the strided variants (see numbabn._layouts).
LAYOUTS = ("contiguous", "channels_last", "negative", "inner_slice")


def ordered(values: np.ndarray) -> np.ndarray:
    """16-bit floats as integers in the order of their values (adjacent floats differ by 1)."""
    bits = np.ascontiguousarray(values).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def assert_within_one_ulp(ours: np.ndarray, exact: np.ndarray, dtype: np.dtype) -> int:
    """``ours`` (of ``dtype``) within 1 ulp of float64 ``exact`` rounded to ``dtype``, with
    its NaN and infinities; return the largest distance found."""
    assert ours.dtype == dtype
    want = exact.astype(dtype)
    ours64, want64 = ours.astype(np.float64), want.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(ours64), np.isnan(want64))
    finite = ~np.isnan(want64)
    distance = np.abs(ordered(ours)[finite] - ordered(want)[finite])
    worst = int(distance.max(initial=0))
    assert worst <= 1, f"{worst} ulps from the exact result"
    return worst


def assert_no_further_than(ours: np.ndarray, theirs: np.ndarray, exact: np.ndarray) -> None:
    """Elementwise, ``ours`` is no further from ``exact`` than PyTorch's ``theirs``."""
    ours64, theirs64 = ours.astype(np.float64), theirs.astype(np.float64)
    finite = np.isfinite(exact) & np.isfinite(theirs64)
    assert np.all(np.abs(ours64 - exact)[finite] <= np.abs(theirs64 - exact)[finite] * (1 + 1e-9))


def torch_module(dim: int, channels: int, dtype: Any, **kwargs: Any) -> Any:
    return getattr(torch.nn, f"BatchNorm{dim}d")(channels, dtype=dtype, **kwargs)


@HALVES
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_and_eval_steps_of_a_float32_module(dtype, layout, rng):
    """Half data into a float32 module: half outputs and input gradients, float32 state and
    parameter gradients; each result exact to 1 ulp and at least as near as PyTorch's."""
    shape = (6, 3, 9, 11)
    module, theirs = numbabn.BatchNorm2d(3), torch_module(2, 3, torch.float32)
    weight = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    module.weight[...] = weight
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(weight))
    for step, training in enumerate((True, True, False)):
        module.train(training)
        theirs.train(training)
        x = make_input(rng, shape, layout, dtype, loc=2.0 * step, scale=3.0)
        dy = make_input(rng, shape, layout, dtype)
        before = (module.running_mean.copy(), module.running_var.copy())
        y = module(x)
        x_t = to_torch(np.ascontiguousarray(x)).requires_grad_()
        y_t = theirs(x_t)
        y_t.backward(to_torch(np.ascontiguousarray(dy)))
        dx = module.backward(dy)

        forward = reference.forward(x, weight, None, *before, training=training)
        exact_dx = reference.backward(dy, x, forward.mean, forward.invstd, weight, training)
        assert_within_one_ulp(y, forward.output, dtype)
        assert_within_one_ulp(dx, exact_dx.grad_input, dtype)
        assert_no_further_than(y, from_torch(y_t.detach()), forward.output)
        assert_no_further_than(dx, from_torch(x_t.grad), exact_dx.grad_input)
        for ours, exact in (
            (module.running_mean, forward.running_mean),
            (module.running_var, forward.running_var),
        ):
            assert ours.dtype == np.float32
            np.testing.assert_allclose(ours, exact, rtol=2e-6, atol=2e-6)
        for name in ("weight", "bias"):
            assert module.grads[name].dtype == np.float32
        module.zero_grad()


@HALVES
@pytest.mark.parametrize("converted", ["dtype=", "converted"])
def test_a_half_module_keeps_everything_in_its_dtype(dtype, converted, rng):
    shape = (8, 4, 5, 5)
    if converted == "dtype=":
        module = numbabn.BatchNorm2d(4, dtype=dtype)
    else:
        module = (
            numbabn.BatchNorm2d(4).bfloat16()
            if dtype == BFLOAT16
            else numbabn.BatchNorm2d(4).half()
        )
    theirs = torch_module(2, 4, TORCH[dtype])
    x = make_input(rng, shape, "contiguous", dtype, loc=1.0)
    dy = make_input(rng, shape, "contiguous", dtype)
    before = (module.running_mean.astype(np.float64), module.running_var.astype(np.float64))
    y, dx = module(x), module.backward(dy)
    y_t = theirs(to_torch(x.copy()).requires_grad_())
    forward = reference.forward(x, None, None, *before)
    backward = reference.backward(dy, x, forward.mean, forward.invstd)
    for array in (y, dx, module.weight, module.bias, module.running_mean, module.running_var,
                  module.grads["weight"], module.grads["bias"]):  # fmt: skip
        assert array.dtype == dtype
    assert_within_one_ulp(y, forward.output, dtype)
    assert_within_one_ulp(dx, backward.grad_input, dtype)
    assert_within_one_ulp(module.running_mean, forward.running_mean, dtype)
    assert_within_one_ulp(module.running_var, forward.running_var, dtype)
    assert_within_one_ulp(module.grads["weight"], backward.grad_weight, dtype)
    assert_within_one_ulp(module.grads["bias"], backward.grad_bias, dtype)
    assert_no_further_than(y, from_torch(y_t.detach()), forward.output)
    assert_no_further_than(module.running_var, from_torch(theirs.running_var), forward.running_var)


@HALVES
def test_fused_relu_and_residual_with_out(dtype, rng):
    shape = (4, 5, 6, 7)
    module = numbabn.BatchNorm2d(5, activation="relu")
    x, z, dy = (make_input(rng, shape, layout, dtype) for layout in ("channels_last",) * 3)
    out = np.empty(shape, dtype)
    y = module(x, out, residual=z)
    assert y is out
    forward = reference.forward(x, None, None, np.zeros(5), np.ones(5))
    pre = forward.output + z.astype(np.float64)
    assert_within_one_ulp(y, np.maximum(pre, 0.0), dtype)
    dx, dz = module.backward(dy)
    masked = np.where(pre > 0.0, dy.astype(np.float64), 0.0)
    assert_within_one_ulp(dz, masked, dtype)
    exact = reference.backward(masked, x, forward.mean, forward.invstd).grad_input
    assert_within_one_ulp(dx, exact, dtype)


@HALVES
def test_fused_relu_of_values_that_round_to_zero(dtype):
    """A pre-activation that rounds to zero in the half type: the ReLU's output sign and
    its gradient mask are PyTorch's, whose ReLU runs on the rounded value."""
    # Per channel (x and the mean are 0, so the pre-activation is the bias, in PyTorch's
    # arithmetic too): +-tiny rounds to +-0, +-above to the smallest subnormal; the
    # ReLU gives +0, -0, that subnormal, +0.
    tiny, above = (2.0**-140, 1.5 * 2.0**-134) if dtype == BFLOAT16 else (1e-9, 4e-8)
    bias = np.array([tiny, -tiny, above, -above], np.float32)
    x = np.zeros((2, 4, 3), dtype)
    dy = np.ones_like(x)
    stats = np.zeros(4, np.float32), np.ones(4, np.float32)
    weight = np.ones(4, np.float32)
    y, saved = F.batch_norm_forward(x, *stats, weight, bias, training=False, activation="relu")
    dx = F.batch_norm_backward(dy, x, saved, weight, bias=bias, activation="relu")[0]

    tx = to_torch(x).clone().requires_grad_(True)
    ty = torch.relu(
        torch.nn.functional.batch_norm(
            tx, *map(torch.from_numpy, (*stats, weight, bias)), training=False
        )
    )
    ty.backward(to_torch(dy))
    np.testing.assert_array_equal(y.view(np.uint16), from_torch(ty.detach()).view(np.uint16))
    assert np.signbit(y.astype(np.float32)[:, 1]).all()  # what the case is about
    np.testing.assert_array_equal(dx != 0, from_torch(tx.grad) != 0)
    assert (dx[:, 2] != 0).all() and (dx[:, [0, 1, 3]] == 0).all()


@HALVES
def test_read_only_and_broadcast_input(dtype, rng):
    x = make_input(rng, (5, 3, 4, 4), "contiguous", dtype)
    x.setflags(write=False)
    row = make_input(rng, (1, 3, 4, 4), "contiguous", dtype)
    for data in (x, np.broadcast_to(row, (5, 3, 4, 4))):
        y = F.batch_norm(data, None, None, training=True)
        assert_within_one_ulp(y, reference.forward(data).output, dtype)


@HALVES
def test_pytorch_tensors_in_and_out_share_memory(dtype, rng):
    x = make_input(rng, (4, 3, 5), "contiguous", dtype)
    x_t, out_t = to_torch(x), torch.empty(4, 3, 5, dtype=TORCH[dtype])
    assert np.shares_memory(host_arrays.adopt(x_t), x)
    y = F.batch_norm(x_t, None, None, training=True, out=out_t)
    assert y is out_t
    assert_within_one_ulp(from_torch(out_t), reference.forward(x).output, dtype)
    fresh = F.batch_norm(x_t, None, None, training=True)
    assert isinstance(fresh, torch.Tensor) and fresh.dtype == TORCH[dtype]
    assert torch.equal(fresh, out_t)


@HALVES
def test_nonfinite_values_and_overflow_as_pytorch(dtype, rng):
    x = make_input(rng, (6, 4, 3), "contiguous", dtype)
    x[0, 1, 0] = np.nan
    x[1, 2, 2] = np.inf
    x[2, 3, 1], x[3, 3, 1] = np.inf, -np.inf
    weight = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    if dtype == FLOAT16:
        weight[0] = 1e5  # beyond float16's range on output: +-inf, as PyTorch's
    running = (np.zeros(4, np.float32), np.ones(4, np.float32))
    theirs = [torch.from_numpy(vector.copy()) for vector in running]
    y = F.batch_norm(x, *running, weight, training=True)
    y_t = torch.nn.functional.batch_norm(
        to_torch(x.copy()), *theirs, torch.from_numpy(weight), training=True
    )
    expected = from_torch(y_t).astype(np.float64)
    got = y.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(
        np.isinf(got) * np.sign(got), np.isinf(expected) * np.sign(expected)
    )
    if dtype == FLOAT16:
        assert np.isinf(got[:, 0]).any()
    for ours, their in zip(running, theirs, strict=True):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(their.numpy()))


@HALVES
def test_same_bits_whatever_the_thread_count(dtype, rng):
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba was started with a single thread")
    x = make_input(rng, (4, 3, 130, 130), "channels_last", dtype)
    dy = make_input(rng, (4, 3, 130, 130), "contiguous", dtype)
    results = []
    for threads in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            y, saved = F.batch_norm_forward(x, None, None, training=True)
            dx = F.batch_norm_backward(dy, x, saved)[0]
        finally:
            numba.set_num_threads(previous)
        results.append((y.tobytes(), dx.tobytes()))
    assert results[0] == results[1]


@HALVES
def test_channel_stats_sync_batch_norm_and_dask(dtype, rng):
    x = make_input(rng, (8, 3, 6, 6), "contiguous", dtype, loc=5.0)
    exact = reference.forward(x)
    stats = numbabn.ChannelStats(3).update(x)
    np.testing.assert_allclose(stats.mean, exact.mean, rtol=1e-12)

    mpi = pytest.importorskip("mpi4py.MPI")
    sync = numbabn.SyncBatchNorm(3, comm=mpi.COMM_SELF)
    y = sync(x)
    assert sync.running_mean.dtype == np.float32
    assert_within_one_ulp(y, exact.output, dtype)
    assert_within_one_ulp(
        sync.backward(x), reference.backward(x, x, exact.mean, exact.invstd).grad_input, dtype
    )

    da = pytest.importorskip("dask.array")
    lazy = numbabn.BatchNorm2d(3)(da.from_array(x, chunks=(3, 3, 6, 6)))
    assert lazy.dtype == dtype
    assert_within_one_ulp(lazy.compute(), exact.output, dtype)


@HALVES
def test_folding_a_half_module_gives_float32_weights(dtype, rng):
    from numbabn.folding import fold_into_conv

    module = numbabn.BatchNorm2d(4, dtype=dtype)
    module(make_input(rng, (6, 4, 3, 3), "contiguous", dtype, loc=1.0))
    module.eval()
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    folded, bias = fold_into_conv(weight, None, module)
    assert folded.dtype == bias.dtype == np.float32
    invstd = 1 / np.sqrt(module.running_var.astype(np.float64) + module.eps)
    np.testing.assert_allclose(folded, weight * invstd[:, None, None, None], rtol=1e-6)


@settings(max_examples=15)
@given(st.data())
def test_generated_cases_within_one_ulp(data):
    dtype = data.draw(st.sampled_from([BFLOAT16, FLOAT16]), label="dtype")
    ndim = data.draw(st.integers(2, 4), label="ndim")
    shape = tuple(data.draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    assume(shape[0] * math.prod(shape[2:]) > 1)
    layout = data.draw(st.sampled_from(layouts_for(ndim)), label="layout")
    loc = data.draw(st.sampled_from([0.0, 3.0, 200.0]), label="loc")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 40.0]), label="scale")
    training = data.draw(st.booleans(), label="training")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = make_input(rng, shape, layout, dtype, loc=loc, scale=scale)
    dy = make_input(rng, shape, "contiguous", dtype)
    channels = shape[1]
    weight = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    running = (rng.uniform(-1, 1, channels).astype(np.float32),
               rng.uniform(0.5, 2, channels).astype(np.float32))  # fmt: skip
    forward = reference.forward(x, weight, None, *running, training=training)
    y, saved = F.batch_norm_forward(x, *running, weight, training=training)
    assert_within_one_ulp(y, forward.output, dtype)
    dx = F.batch_norm_backward(dy, x, saved, weight)[0]
    exact = reference.backward(dy, x, forward.mean, forward.invstd, weight, training)
    assert_within_one_ulp(dx, exact.grad_input, dtype)


def test_dtype_rules_as_pytorch():
    x = np.ones((4, 3), BFLOAT16)
    with pytest.raises(RuntimeError, match="expect parameter to have scalar type of Float"):
        F.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
        F.batch_norm(
            x, np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(3, BFLOAT16), training=True
        )
    with pytest.raises(RuntimeError, match="mixed dtype"):
        numbabn.BatchNorm1d(3, dtype=np.float64)(x)
    assert F.batch_norm(x, None, None, training=True).dtype == BFLOAT16


def test_importing_numbabn_needs_no_ml_dtypes():
    code = "import sys, numbabn, numpy as np; numbabn.BatchNorm1d(2, dtype=np.float16).half()"
    code += "; assert 'ml_dtypes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@HALVES
def test_kernels_round_float64_once_to_nearest_even(dtype):
    """The kernels' store of a float64 (narrowed) is NumPy's or ml_dtypes' single rounding,
    where rounding to float32 first would round some values twice; their load (widen) exact."""
    from numba import njit

    from numbabn._cpu.halves import as_bits, narrowed, widen

    @njit
    def store(values, out):
        for i in range(values.shape[0]):
            out[i] = narrowed(values[i], out)

    @njit
    def load(bits, out):
        for i in range(bits.shape[0]):
            out[i] = widen(bits[i])

    rng = np.random.default_rng(5)
    spare = 2.0 ** -(8 if dtype == BFLOAT16 else 11)  # half an ulp of 1
    values = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-45, 40, 20000),
        1 + spare + np.array([2.0**-30, -(2.0**-30), 2.0**-50, 0.0]),  # twice: wrong side
        (np.arange(1, 500) + 0.5) * 2.0**-133,  # bfloat16's subnormals
        (np.arange(1, 500) + 0.5) * 2.0**-24,  # float16's
        [np.inf, -np.inf, np.nan, 0.0, 65519.99, 65520.0, 3.4e38, 1e300, 2.0**-300],
        # NaNs whose payload the rounding addition would carry into the sign bit
        np.array([2**64 - 1, 2**63 - 2**42], np.uint64).view(np.float64),
    ])  # fmt: skip
    values = np.concatenate([values, -values])
    out = np.empty(values.size, dtype)
    store(values, as_bits(out))
    with np.errstate(over="ignore"):
        expected = values.astype(dtype)
    nan = np.isnan(values)
    np.testing.assert_array_equal(out.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(out[nan].astype(np.float32)).all()
    wide = np.empty(values.size)
    load(as_bits(out), wide)
    np.testing.assert_array_equal(wide, out.astype(np.float64))


@HALVES
@pytest.mark.parametrize("module_dtype", ["float32", "its own"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_planned_small_calls_give_the_bits_of_the_full_path(dtype, module_dtype, layout, rng):
    """Small forwards and training backwards without out= run in one compiled call
    (numbabn._cpu.serial): the same bits as the separate passes, which out= takes."""
    modules = [numbabn.BatchNorm2d(5, dtype=np.float32 if module_dtype == "float32" else dtype)
               for _ in range(2)]  # fmt: skip
    planned, checked = modules
    for step in range(3):
        if step == 2:
            planned.eval()
            checked.eval()
        x = make_input(rng, (2, 5, 6, 7), layout, dtype, loc=1.0)
        y = planned(x)
        out = np.empty_like(y)
        checked(x, out=out)
        assert y.dtype == dtype and y.tobytes() == out.tobytes()
        assert planned.running_var.tobytes() == checked.running_var.tobytes()
        dy = make_input(rng, (2, 5, 6, 7), layout, dtype)
        dx = planned.backward(dy)
        full = np.empty_like(dx)
        checked.backward(dy, out=full)
        assert dx.dtype == dtype and dx.tobytes() == full.tobytes()
        for name in ("weight", "bias"):
            assert planned.grads[name].tobytes() == checked.grads[name].tobytes()
