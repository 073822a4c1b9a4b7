"""SyncBatchNorm under ``mpiexec -n 2`` and ``-n 3`` (uneven and empty ranks), and ChannelStats."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
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
def test_sync_matches_single_process_on_concatenated_batch(ranks):
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    command = [MPIEXEC, "-n", str(ranks), sys.executable, str(HERE / "mpi" / "sync_workload.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sync ok on {ranks} ranks" in result.stdout


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
