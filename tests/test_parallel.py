"""Items spread over Numba's threads: same bytes as one call, and safe after a fork."""

from __future__ import annotations

import multiprocessing

import numba
import numpy as np
import pytest

import numbabn
from numbabn._cpu import kernels
from numbabn._cpu.backend import _Operands
from numbabn._cpu.jit import launch
from numbabn._cpu.parallel import run_items

needs_two_threads = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2, reason="Numba was started with a single thread"
)


@needs_two_threads
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels-inner"])
def test_threads_write_what_one_call_writes(dtype, channels_last):
    x = np.random.default_rng(0).standard_normal((8, 5, 40, 41)).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    ops = _Operands(x)
    assert ops.tiling.channels_inner == channels_last
    shift = ops.first_values()
    vector = np.linspace(0.5, 1.5, x.shape[1])
    calls = {
        "sums": (kernels.SUMS[ops.family], ops.view, ops.view, shift, shift, True),
        "affine": (kernels.AFFINE[ops.family], ops.view, shift, vector, vector),
        "grad": (kernels.GRAD[ops.family], ops.view, ops.view, shift, vector, vector, vector),
    }
    for name, (kernel, *args) in calls.items():
        one, spread = (
            ops.partials() if name == "sums" else np.empty_like(ops.view) for _ in range(2)
        )
        launch(kernel, *args, *ops.launch_args, one, 0, ops.n_items)
        run_items(kernel, ops.n_items, *args, *ops.launch_args, spread)
        assert one.tobytes() == spread.tobytes(), name


@needs_two_threads
def test_one_strided_driver_variant_runs_both_kernel_variants():
    from numbabn._cpu import parallel

    full = np.random.default_rng(1).standard_normal((8, 5, 40, 42))
    for x in (full, full[..., 1:]):  # C-contiguous, then strided
        ops = _Operands(x)
        vector = np.linspace(0.5, 1.5, x.shape[1])
        args = (ops.view, vector, vector, vector, *ops.launch_args)
        one, spread = np.empty_like(ops.view), np.empty_like(ops.view)
        launch(kernels.AFFINE[ops.family], *args, one, 0, ops.n_items)
        run_items(kernels.AFFINE[ops.family], ops.n_items, *args, spread)
        assert one.tobytes() == spread.tobytes()
    float64_variants = [
        signature
        for signature in parallel._affine.overloads
        if any(getattr(arg, "ndim", 0) == 4 and arg.dtype == numba.float64 for arg in signature)
    ]
    assert len(float64_variants) == 1
    assert all(arg.layout == "A" for arg in float64_variants[0] if getattr(arg, "ndim", 0) == 4)


def _forward_in_child(x: np.ndarray, results: multiprocessing.Queue) -> None:
    results.put(numbabn.BatchNorm2d(x.shape[1])(x))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)
def test_a_forked_child_still_computes_the_same_bytes():
    x = np.random.default_rng(1).standard_normal((4, 3, 130, 130)).astype(np.float32)
    expected = numbabn.BatchNorm2d(3)(x)  # the parent has launched its threads
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_forward_in_child, args=(x, results))
    child.start()
    got = results.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got.tobytes() == expected.tobytes()
