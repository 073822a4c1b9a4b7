"""SyncBatchNorm under ``mpiexec -n 2`` and ``-n 3`` (uneven and empty ranks), and ChannelStats."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import numbabn as nbn

pytest.importorskip("mpi4py")
HERE = Path(__file__).parent
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_matches_single_process_on_concatenated_batch(ranks, device):
    """On host arrays, and on CUDA arrays in Numba's simulator (a GPU's in make gpu-check)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    if device == "cuda":
        env.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    workload = str(HERE / "mpi" / "sync_workload.py")
    command = [MPIEXEC, "-n", str(ranks), sys.executable, workload, "--device", device]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sync ok on {ranks} ranks ({device})" in result.stdout


def test_sync_with_one_rank_equals_batchnorm():
    from mpi4py import MPI

    x = np.random.default_rng(0).standard_normal((6, 3, 4, 4))
    plain = nbn.BatchNorm2d(3, dtype=np.float64)
    synced = nbn.SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    np.testing.assert_allclose(synced(x), plain(x), rtol=0, atol=1e-14)
    dy = np.cos(x)
    np.testing.assert_allclose(synced.backward(dy), plain.backward(dy), atol=1e-12)
    np.testing.assert_allclose(synced.grads["weight"], plain.grads["weight"], atol=1e-12)
    np.testing.assert_allclose(synced.running_var, plain.running_var, rtol=1e-15)


def test_convert_sync_batchnorm_shares_state():
    from mpi4py import MPI

    model = {"blocks": [nbn.BatchNorm2d(3), "relu"], "head": nbn.BatchNorm1d(5)}
    converted = nbn.SyncBatchNorm.convert_sync_batchnorm(model, comm=MPI.COMM_SELF)
    block = converted["blocks"][0]
    assert isinstance(block, nbn.SyncBatchNorm)
    assert converted["blocks"][1] == "relu"
    assert block.weight is model["blocks"][0].weight
    assert block.running_mean is model["blocks"][0].running_mean
    block(np.ones((2, 3, 2, 2), np.float32))
    assert int(model["blocks"][0].num_batches_tracked) == 1


def test_channel_stats_merge_uneven_chunks_exactly():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((17, 4, 5)) * 3 + 1e4
    chunks = [x[:1], x[1:8], x[8:8], x[8:]]
    merged = nbn.ChannelStats(4)
    for chunk in chunks:
        merged.merge(nbn.ChannelStats(4).update(chunk))
    assert merged.count == 17 * 5
    np.testing.assert_allclose(merged.mean, x.mean(axis=(0, 2)), rtol=1e-15, atol=1e-11)
    np.testing.assert_allclose(merged.var, x.var(axis=(0, 2)), rtol=1e-10)
    np.testing.assert_allclose(merged.unbiased_var, x.var(axis=(0, 2), ddof=1), rtol=1e-10)
    restored = pickle.loads(pickle.dumps(nbn.ChannelStats.from_dict(merged.to_dict())))
    np.testing.assert_array_equal(restored.m2, merged.m2)


def test_set_running_stats_precise_bn():
    x = np.random.default_rng(2).standard_normal((32, 3, 4, 4)).astype(np.float32) + 5
    stats = nbn.ChannelStats(3)
    for batch in np.split(x, 4):
        stats.update(batch)
    bn = nbn.BatchNorm2d(3)
    nbn.set_running_stats(bn, stats)
    np.testing.assert_allclose(bn.running_mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        nbn.set_running_stats(nbn.BatchNorm2d(4), stats)


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
def test_data_parallel_example_runs():
    example = HERE.parent / "examples" / "mpi_data_parallel.py"
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    command = [MPIEXEC, "-n", "2", sys.executable, str(example)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical on all ranks: True" in result.stdout
    final_accuracy = float(result.stdout.split("accuracy ")[-2].split()[0])
    assert final_accuracy > 0.7


# Where one channel holds non-finite values: PyTorch's mean is +-inf for infinities of
# one sign and NaN otherwise; its variance is NaN.
NONFINITE = {
    "inf": [((2, 1, 3), np.inf)],
    "-inf": [((4, 1, 0), -np.inf)],
    "nan": [((1, 1, 2), np.nan)],
    "inf and -inf": [((0, 1, 1), np.inf), ((5, 1, 2), -np.inf)],
    "inf twice": [((0, 1, 1), np.inf), ((5, 1, 2), np.inf)],
    "inf and nan": [((0, 1, 1), np.inf), ((3, 1, 2), np.nan)],
}


def _with_nonfinite(case: str) -> np.ndarray:
    x = np.random.default_rng(5).standard_normal((6, 3, 4)) + 2.0
    for index, value in NONFINITE[case]:
        x[index] = value
    return x


def _torch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's output and running statistics of one training step on ``x``."""
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm1d(x.shape[1], dtype=torch.float64)
    y = bn(torch.from_numpy(x)).detach().numpy()
    return y, bn.running_mean.numpy(), bn.running_var.numpy()


def _assert_same_pattern(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Same NaN and +-inf positions, and the finite values to float64 rounding."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +inf")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=1e-12, err_msg=what)


@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("pieces", [(6,), (2, 4), (1, 2, 3), (0, 3, 0, 1, 2)])
def test_channel_stats_merge_of_nonfinite_data_gives_pytorchs_mean(case, pieces):
    x = _with_nonfinite(case)
    _, running_mean, running_var = _torch_stats(x)
    merged = nbn.ChannelStats(3)
    with np.errstate(all="raise"):  # no warning either
        for chunk in np.split(x, np.cumsum(pieces)[:-1]):
            merged.merge(nbn.ChannelStats(3).update(chunk))
    assert merged.count == 6 * 4
    # The running statistics hold 0.1 of the batch's: the same pattern of NaN and inf.
    _assert_same_pattern(merged.mean * 0.1, running_mean, "mean")
    _assert_same_pattern(0.9 + merged.unbiased_var * 0.1, running_var, "variance")


@pytest.mark.parametrize("case", list(NONFINITE))
def test_sync_with_one_rank_on_nonfinite_data_is_pytorch(case):
    from mpi4py import MPI

    x = _with_nonfinite(case)
    y_torch, running_mean, running_var = _torch_stats(x)
    synced = nbn.SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    y = synced(x)
    _assert_same_pattern(y, y_torch, "output")
    _assert_same_pattern(synced.running_mean, running_mean, "running_mean")
    _assert_same_pattern(synced.running_var, running_var, "running_var")


def test_merge_of_finite_statistics_is_unchanged_bit_for_bit():
    """The finite path is Chan et al.'s formulas exactly as written (results are pinned)."""
    rng = np.random.default_rng(9)
    parts = [rng.standard_normal((n, 5, 3)) * 7 + 1e3 for n in (3, 1, 4)]
    merged = nbn.ChannelStats(5)
    expected_mean, expected_m2, count = np.zeros(5), np.zeros(5), 0
    for part in parts:
        stats = nbn.ChannelStats(5).update(part)
        merged.merge(stats)
        total = count + stats.count
        delta = stats.mean - expected_mean
        expected_mean = expected_mean + delta * (stats.count / total)
        expected_m2 = expected_m2 + stats.m2 + delta * delta * (count * stats.count / total)
        count = total
    assert merged.mean.tobytes() == expected_mean.tobytes()
    assert merged.m2.tobytes() == expected_m2.tobytes()


def test_bench_sync_makes_the_count_of_calls_every_rank_agrees_on():
    """A timing sample makes the most calls any rank needs: each call is a collective."""
    pytest.importorskip("mpi4py")
    from tools.bench.sync import agreed_median_seconds

    class SlowerRankElsewhere:
        """A communicator where another rank needs 50 calls per sample."""

        def allreduce(self, value, op):
            return max(value, 50)

    calls = []

    def step() -> None:  # 3 ms: one call per sample would do on this rank
        calls.append(1)
        time.sleep(3e-3)

    agreed_median_seconds(SlowerRankElsewhere(), [step], repeat=3)
    # Two calls size the sample; each of the 3 samples has an untimed call, then 50 timed.
    assert len(calls) == 2 + 3 * (1 + 50)
