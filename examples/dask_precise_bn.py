"""Exact ("precise BN") statistics of a chunked data set, through a two-worker Dask cluster.

    python examples/dask_precise_bn.py --store /tmp/features.zarr

1. Writes a synthetic feature data set, chunked along the batch and the
   channels, to a zarr store (as a feature extractor would, batch by batch).
2. Computes the exact per-channel mean and variance of the whole store on a
   ``distributed.LocalCluster`` of two worker processes: one pass over the
   data, merged in an order fixed by the chunk grid, so the bits do not depend
   on the cluster.
3. Sets a BatchNorm2d's running statistics to them and writes the normalised
   copy back to the store, lazily, block by block, with a progress bar.

Needs ``pip install 'numbabn[dask]' distributed zarr``.
"""

from __future__ import annotations

import argparse
import time

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, progress

import numbabn as nbn
from numbabn.dask import channel_stats


def write_dataset(store: str, batches: int, seed: int) -> None:
    """Feature maps of shape (batches * 32, 64, 28, 28), float32, chunked (32, 16, 28, 28)."""
    rng = da.random.default_rng(seed)
    shape, chunks = (batches * 32, 64, 28, 28), (32, 16, 28, 28)
    scale = da.from_array(np.linspace(0.5, 4.0, 64, dtype=np.float32).reshape(1, 64, 1, 1))
    features = rng.standard_normal(shape, chunks=chunks, dtype=np.float32) * scale + 10.0
    features.to_zarr(store, component="features", overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="features.zarr", help="zarr store to write")
    parser.add_argument("--batches", type=int, default=16, help="batches of 32 to generate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Two single-threaded workers: numbabn.dask runs each task's kernel on that thread,
    # so two cores, without oversubscription.
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, Client(cluster):
        start = time.perf_counter()
        write_dataset(args.store, args.batches, args.seed)
        features = da.from_zarr(args.store, component="features")
        print(f"wrote {features.nbytes / 1e6:.0f} MB in {features.npartitions} chunks "
              f"to {args.store} ({time.perf_counter() - start:.1f} s)")  # fmt: skip

        start = time.perf_counter()
        stats = channel_stats(features)
        print(f"exact statistics of {stats.count} values per channel "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip

        bn = nbn.BatchNorm2d(features.shape[1])
        nbn.set_running_stats(bn, stats)
        bn.eval()
        normalised = bn(features)  # lazy: one map_blocks over the store's chunks
        writing = normalised.to_zarr(
            args.store, component="normalised", overwrite=True, compute=False
        )
        print("writing the normalised copy:")
        future = writing.persist()
        progress(future)
        future.compute()

        check = da.from_zarr(args.store, component="normalised")
        mean, std = (float(value.compute()) for value in (check.mean(), check.std()))
        print(f"\nnormalised copy: mean {mean:+.2e}, std {std:.4f}")
        assert abs(mean) < 1e-3 and abs(std - 1.0) < 1e-3


if __name__ == "__main__":
    main()
