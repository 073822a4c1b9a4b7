"""numbabn.dask: exact statistics and lazy normalisation of chunked arrays.

Every result is compared with in-memory numbabn on the same data (itself tested
against the NumPy reference and PyTorch), with the reference for the statistics,
and across schedulers, bit for bit: the threaded and synchronous schedulers and
a two-process ``distributed.LocalCluster``.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
from conftest import assert_same_state, make_input, snapshot, tolerances

import numbabn as nbn

da = pytest.importorskip("dask.array")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

nbdask = pytest.importorskip("numbabn.dask")

CHUNKINGS = [
    (16, 6, 5, 7),  # one block
    (5, 6, 5, 7),  # along the batch only, ragged
    (16, 2, 3, 7),  # along channels and a spatial axis
    (3, 4, 2, 3),  # along every axis
]


def _data(rng, dtype=np.float32, shape=(16, 6, 5, 7)):
    return make_input(rng, shape, dtype=dtype, loc=100.0, scale=3.0)


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_stats_match_in_memory_and_reference(rng, chunks, dtype):
    x = _data(rng, dtype)
    stats = nbdask.channel_stats(da.from_array(x, chunks=chunks))
    in_memory = nbn.ChannelStats(6).update(x)
    mean, var = reference.batch_mean_var(x.astype(np.float64))
    assert stats.count == in_memory.count == 16 * 5 * 7
    np.testing.assert_allclose(stats.mean, in_memory.mean, rtol=1e-14)
    np.testing.assert_allclose(stats.var, in_memory.var, rtol=1e-12)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(stats.var, var, rtol=1e-12)


@given(data=st.data())
def test_any_chunking_matches_in_memory(data):
    """Generated shapes and chunk grids, ragged ones included."""
    shape = data.draw(st.tuples(*(st.integers(1, 6) for _ in range(4))), label="shape")
    chunks = tuple(
        data.draw(st.integers(1, size), label=f"chunks {axis}") for axis, size in enumerate(shape)
    )
    if shape[0] * shape[2] * shape[3] < 2:
        shape = (2, *shape[1:])
    x = _data(np.random.default_rng(shape), np.float64, shape)
    stats = nbdask.channel_stats(da.from_array(x, chunks=chunks))
    in_memory = nbn.ChannelStats(shape[1]).update(x)
    np.testing.assert_allclose(stats.mean, in_memory.mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(stats.m2, in_memory.m2, rtol=1e-10, atol=1e-10)
    running = [np.zeros(shape[1]), np.ones(shape[1])]
    lazy = nbdask.batch_norm(da.from_array(x, chunks=chunks), *running, training=True)
    expected = nbn.functional.batch_norm(x, np.zeros(shape[1]), np.ones(shape[1]), training=True)
    np.testing.assert_allclose(lazy.compute(), expected, **tolerances(np.float64))


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_channel_axis_anywhere(rng, axis):
    x = _data(rng)  # channels on axis 1; moved to ``axis``
    moved = np.moveaxis(x, 1, axis)
    chunks = tuple(max(1, size // 2) for size in moved.shape)
    stats = nbdask.channel_stats(da.from_array(moved, chunks=chunks), axis=axis)
    in_memory = nbn.ChannelStats(6).update(x)
    assert stats.count == in_memory.count
    np.testing.assert_allclose(stats.mean, in_memory.mean, rtol=1e-14)
    np.testing.assert_allclose(stats.var, in_memory.var, rtol=1e-12)


def test_same_bits_on_every_scheduler(rng):
    x = da.from_array(_data(rng), chunks=(3, 4, 2, 3))
    results = [
        nbdask.channel_stats(x, scheduler=scheduler)
        for scheduler in ("threads", "sync", "processes")
    ]
    for other in results[1:]:
        assert other.mean.tobytes() == results[0].mean.tobytes()
        assert other.m2.tobytes() == results[0].m2.tobytes()


def test_merge_order_depends_on_chunks_not_split_every_results(rng):
    """Another tree over the same chunks is still exact (within float64 rounding)."""
    x = da.from_array(_data(rng, np.float64), chunks=(1, 6, 5, 7))
    wide = nbdask.channel_stats(x, split_every=16)
    narrow = nbdask.channel_stats(x, split_every=2)
    np.testing.assert_allclose(wide.mean, narrow.mean, rtol=1e-14)
    np.testing.assert_allclose(wide.m2, narrow.m2, rtol=1e-12)


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_in_memory(rng, chunks, training):
    x = _data(rng)
    weight, bias = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.standard_normal(6)
    bias = bias.astype(np.float32)
    running = [rng.standard_normal(6).astype(np.float32), rng.uniform(1, 2, 6).astype(np.float32)]
    theirs = [vector.copy() for vector in running]
    lazy = nbdask.batch_norm(
        da.from_array(x, chunks=chunks), *running, weight, bias, training, 0.3, 1e-4
    )
    assert isinstance(lazy, da.Array) and lazy.chunks == da.from_array(x, chunks=chunks).chunks
    expected = nbn.functional.batch_norm(x, *theirs, weight, bias, training, 0.3, 1e-4)
    np.testing.assert_allclose(lazy.compute(), expected, **tolerances(np.float32))
    for ours, reference_vector in zip(running, theirs, strict=True):
        np.testing.assert_allclose(ours, reference_vector, rtol=1e-6)


def test_batch_norm_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    x = _data(rng)
    running = [np.zeros(6, np.float32), np.ones(6, np.float32)]
    lazy = nbdask.batch_norm(da.from_array(x, chunks=(4, 3, 5, 7)), *running, training=True)
    torch_running = [torch.zeros(6), torch.ones(6)]
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), *torch_running, training=True)
    np.testing.assert_allclose(lazy.compute(), expected.numpy(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(running, torch_running, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, shape", [
    (nbn.BatchNorm1d, (16, 6)),
    (nbn.BatchNorm1d, (16, 6, 9)),
    (nbn.BatchNorm2d, (16, 6, 5, 7)),
    (nbn.BatchNorm3d, (4, 6, 3, 5, 2)),
    (nbn.LazyBatchNorm2d, (16, 6, 5, 7)),
])  # fmt: skip
def test_modules_take_dask_arrays(rng, cls, shape):
    x = _data(rng, shape=shape)
    if cls is nbn.LazyBatchNorm2d:  # and a cumulative average of the running statistics
        ours, theirs = cls(momentum=None), nbn.BatchNorm2d(6, momentum=None)
    else:
        ours, theirs = cls(6), cls(6)
    chunks = tuple(max(1, size // 2) for size in shape)
    for step in range(2):
        output = ours(da.from_array(x + step, chunks=chunks))
        assert isinstance(output, da.Array)
        np.testing.assert_allclose(output.compute(), theirs(x + step), **tolerances(np.float32))
    np.testing.assert_allclose(ours.running_mean, theirs.running_mean, rtol=1e-6)
    np.testing.assert_allclose(ours.running_var, theirs.running_var, rtol=1e-6)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 2
    ours.eval()
    theirs.eval()
    output = ours(da.from_array(x, chunks=chunks))
    np.testing.assert_allclose(output.compute(), theirs(x), **tolerances(np.float32))


def test_fused_relu_module(rng):
    x = _data(rng, np.float64) - 101.0
    ours, theirs = nbn.BatchNorm2d(6, dtype=np.float64), nbn.BatchNorm2d(6, dtype=np.float64)
    ours.activation = theirs.activation = "relu"
    output = ours(da.from_array(x, chunks=(5, 4, 5, 7))).compute()
    assert (output == 0).any()
    np.testing.assert_allclose(output, theirs(x), **tolerances(np.float64))


def test_precise_bn_from_dask_statistics(rng):
    x = _data(rng, np.float64)
    bn = nbn.BatchNorm2d(6, dtype=np.float64)
    nbn.set_running_stats(bn, nbdask.channel_stats(da.from_array(x, chunks=(4, 3, 5, 7))))
    mean, var = reference.batch_mean_var(x)
    count = x.size // 6
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-14)
    np.testing.assert_allclose(bn.running_var, var * count / (count - 1), rtol=1e-12)


def test_nonfinite_channels_as_in_memory(rng):
    x = _data(rng, np.float64)
    x[3, 1, 2, 2] = np.nan
    x[5, 4, 0, 0] = np.inf
    stats = nbdask.channel_stats(da.from_array(x, chunks=(4, 3, 5, 7)))
    in_memory = nbn.ChannelStats(6).update(x)
    np.testing.assert_array_equal(np.isnan(stats.mean), np.isnan(in_memory.mean))
    np.testing.assert_array_equal(stats.mean[[1, 4]], in_memory.mean[[1, 4]])
    assert np.isnan(stats.var[[1, 4]]).all()
    np.testing.assert_allclose(stats.var[[0, 2, 3, 5]], in_memory.var[[0, 2, 3, 5]], rtol=1e-12)


def test_errors_name_what_was_wrong(rng):
    x = da.from_array(_data(rng), chunks=8)
    with pytest.raises(TypeError, match="expected a dask.array.Array"):
        nbdask.channel_stats(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="out of bounds"):
        nbdask.channel_stats(x, axis=4)
    with pytest.raises(ValueError, match="at least 2D"):
        nbdask.channel_stats(da.zeros(4, dtype=np.float32))
    with pytest.raises(NotImplementedError, match="Long"):
        nbdask.channel_stats(da.zeros((4, 2), dtype=np.int64))
    unknown = x[x[:, 0, 0, 0] > 100]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        nbdask.channel_stats(unknown)
    with pytest.raises(ValueError, match="split_every"):
        nbdask.channel_stats(x, split_every=1)


def test_failed_calls_change_nothing(rng):
    x = da.from_array(_data(rng), chunks=8)
    bn = nbn.BatchNorm2d(6)
    bn(x)
    before = snapshot(bn)
    with pytest.raises(ValueError, match="out= and residual="):
        bn(x, out=np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match="out= and residual="):
        bn(x, residual=x)
    with pytest.raises(RuntimeError, match="BatchNorm2d has float64 parameters"):
        nbn.BatchNorm2d(6, dtype=np.float64)(x)
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements"):
        nbdask.batch_norm(x[:, :5], bn.running_mean, bn.running_var, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(da.from_array(np.ones((1, 6, 1, 1), np.float32)))
    assert_same_state(before, bn)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bn.backward(np.ones(x.shape, np.float32))


def test_read_only_running_statistics_refused_in_training(rng):
    x = da.from_array(_data(rng), chunks=8)
    running = [np.zeros(6, np.float32), np.ones(6, np.float32)]
    for vector in running:
        vector.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean"):
        nbdask.batch_norm(x, *running, training=True)
    nbdask.batch_norm(x, *running).compute()  # evaluation only reads them


@pytest.mark.slow
def test_two_worker_cluster_same_bits_as_threads(rng):
    """A LocalCluster of two single-threaded worker processes."""
    distributed = pytest.importorskip("distributed")
    x = da.from_array(_data(rng), chunks=(3, 4, 2, 3))
    # Blocks large enough for Numba's threads outside Dask: numbabn.dask keeps to one.
    big = da.from_array(_data(rng, shape=(64, 8, 32, 32)), chunks=(32, 4, 32, 32))
    expected = [
        nbdask.channel_stats(x, scheduler="threads"),
        nbdask.channel_stats(big, scheduler="threads"),
        nbn.BatchNorm2d(6)(x).compute(scheduler="threads"),
        nbn.BatchNorm2d(8)(big).compute(scheduler="threads"),
    ]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        results = [
            nbdask.channel_stats(x),
            nbdask.channel_stats(big),
            nbn.BatchNorm2d(6)(x).compute(),
            nbn.BatchNorm2d(8)(big).compute(),
        ]
    for stats, wanted in zip(results[:2], expected[:2], strict=True):
        assert stats.mean.tobytes() == wanted.mean.tobytes()
        assert stats.m2.tobytes() == wanted.m2.tobytes()
    for output, wanted in zip(results[2:], expected[2:], strict=True):
        assert output.tobytes() == wanted.tobytes()


def test_tasks_keep_to_their_thread(rng, monkeypatch):
    """Blocks of any size run their kernels on the task's thread, not Numba's threads."""
    from numbabn._cpu import parallel

    class Refuse:
        """Every start of Numba's threads takes the launch lock: this one refuses."""

        def __enter__(self) -> None:
            raise AssertionError("a Dask task used Numba's thread pool")

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(parallel, "_launch_lock", Refuse())
    big = da.from_array(_data(rng, shape=(64, 8, 32, 32)), chunks=(32, 4, 32, 32))
    nbdask.channel_stats(big)
    nbn.BatchNorm2d(8)(big).compute()
    with pytest.raises(AssertionError, match="thread pool"):
        nbn.BatchNorm2d(8)(big.compute())
