"""Results are bit-for-bit identical whatever the number of threads.

Reductions go through partials per tile whose bounds depend only on the shape,
merged in a fixed order, and the serial kernels (one thread) run the same
code as the parallel ones. So one thread, two threads and three threads (in
another process) must agree to the last bit: outputs, input gradients,
parameter gradients, running statistics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
from determinism_workload import compute

needs_two_threads = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2, reason="Numba was started with a single thread"
)


def assert_bit_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differences = []
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        if got[key].tobytes() != value.tobytes():
            diff = np.max(np.abs(got[key].astype(np.float64) - value.astype(np.float64)))
            differences.append(f"{key} (max abs diff {diff:.3g})")
    if differences:
        pytest.fail("results differ: " + ", ".join(differences))


def _compute_with_threads(n_threads: int) -> dict:
    previous = numba.get_num_threads()
    numba.set_num_threads(n_threads)
    try:
        return compute()
    finally:
        numba.set_num_threads(previous)


@needs_two_threads
def test_one_vs_two_threads():
    """One thread takes the serial kernels; two take the parallel ones."""
    assert_bit_identical(_compute_with_threads(2), _compute_with_threads(1))


@needs_two_threads
def test_repeatable():
    assert_bit_identical(_compute_with_threads(2), _compute_with_threads(2))


def _compute_in_subprocess(path: Path, **environment: str) -> dict:
    script = Path(__file__).with_name("determinism_workload.py")
    env = dict(os.environ, **environment)
    completed = subprocess.run(
        [sys.executable, str(script), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.slow
def test_other_process_with_three_threads(tmp_path):
    """A fresh interpreter with NUMBA_NUM_THREADS=3 gives the very same bytes."""
    theirs = _compute_in_subprocess(tmp_path / "results.npz", NUMBA_NUM_THREADS="3")
    assert int(theirs.pop("num_threads")) == 3
    assert_bit_identical(theirs, compute())


@pytest.mark.slow
def test_fresh_compilation_and_cache_load_agree(tmp_path):
    """Kernels compiled into an empty cache, then loaded from it, give the very same bytes.

    The second process loads the parallel drivers from the cache, where each
    holds its own re-optimised copy of the kernel it calls; they must still run
    the kernel's own code (see ``numbabn._cpu.parallel``).
    """
    cache = str(tmp_path / "numba_cache")
    fresh = _compute_in_subprocess(tmp_path / "fresh.npz", NUMBA_CACHE_DIR=cache)
    cached = _compute_in_subprocess(tmp_path / "cached.npz", NUMBA_CACHE_DIR=cache)
    fresh.pop("num_threads")
    cached.pop("num_threads")
    assert_bit_identical(cached, fresh)
    assert_bit_identical(compute(), fresh)


def test_every_cpu_function_is_cached_under_the_package_digest():
    """A change in any CPU source retires every cached CPU function, not only its own file's."""
    from numbabn._cpu import jit

    assert len(jit.DISPATCHERS) > 20
    stamps = {d._cache._cache_file._source_stamp for d in jit.DISPATCHERS}
    assert stamps == {("numbabn._cpu", jit.source_digest())}


def test_source_digest_covers_every_source(tmp_path, monkeypatch):
    from numbabn._cpu import jit

    assert {path.name for path in jit.SOURCES} >= {"kernels.py", "jit.py", "_coefficients.py"}
    copies = []
    for path in jit.SOURCES:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    monkeypatch.setattr(jit, "SOURCES", tuple(copies))
    jit.source_digest.cache_clear()
    try:
        before = jit.source_digest()
        for path in copies:
            original = path.read_bytes()
            path.write_bytes(original + b"\n")
            jit.source_digest.cache_clear()
            assert jit.source_digest() != before, path.name
            path.write_bytes(original)
    finally:
        jit.source_digest.cache_clear()


@pytest.mark.slow
def test_cuda_kernels_are_cached_under_their_sources_digest():
    """CUDA kernels hold the shared per-channel arithmetic: its file is in their cache key."""
    pytest.importorskip("numba_cuda")
    script = textwrap.dedent(
        """
        from numba.cuda.dispatcher import CUDADispatcher
        from numbabn import _source_stamp
        from numbabn._cuda import kernels

        dispatchers = [
            value for value in vars(kernels).values()
            if isinstance(value, CUDADispatcher) and not value.targetoptions.get("device")
        ]
        for family in (kernels.Family.ROWS, kernels.Family.PLANAR, kernels.Family.CHANNELS_INNER):
            dispatchers += [
                kernels.statistics(family),
                kernels.gradient_sums(family, True, True),
                kernels.elementwise(family, kernels.Mode.AFFINE, True, True),
                kernels.evaluation(family, False, False),
            ]
        stamps = {d._cache._cache_file._source_stamp for d in dispatchers}
        expected = {("numbabn._cuda", _source_stamp.digest(kernels.SOURCES))}
        names = sorted(path.name for path in kernels.SOURCES)
        print(len(dispatchers), stamps == expected, names)
        """
    )
    environment = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # halves.py twice: the CUDA kernels' rounding to bfloat16 and the CPU's code it runs.
    names = "['_coefficients.py', '_tunables.py', 'halves.py', 'halves.py', 'kernels.py']\n"
    assert result.stdout.split(maxsplit=2)[1:] == ["True", names]
    assert int(result.stdout.split()[0]) >= 18  # the per-channel kernels and the factories'
