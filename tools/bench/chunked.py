"""Exact statistics of a Dask array: ``python -m tools.bench.chunked``.

Times :func:`numbabn.dask.channel_stats` beside Dask's own ``x.mean(axis)``
plus ``x.var(axis)`` (computed together, so Dask shares what it can) on the
same persisted float32 array and the same ``distributed.LocalCluster`` of
worker processes with one thread each. The two alternate,
so a slow spell of the machine hits both; medians are reported.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.chunked")
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the array")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each")
    args = parser.parse_args(argv)

    import dask
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    from numbabn.dask import channel_stats

    channels, height, width = 64, 128, 128
    per_image = channels * height * width * 4
    batch = max(16, int(args.gigabytes * 1e9 / per_image) // 16 * 16)
    shape, chunks = (batch, channels, height, width), (16, channels, height, width)
    axes = (0, 2, 3)
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster),
    ):
        x = da.random.default_rng(0).standard_normal(shape, chunks=chunks, dtype=np.float32)
        x = (x * 2.0 + 50.0).persist()
        wait(x)
        channel_stats(x[:16])  # loads (or compiles) the kernels in the workers
        ours, theirs = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            stats = channel_stats(x)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            mean, var = dask.compute(x.mean(axis=axes), x.var(axis=axes))
            theirs.append(time.perf_counter() - start)
    ours_s, theirs_s = float(np.median(ours)), float(np.median(theirs))
    name = "x".join(map(str, shape))
    print(
        f"Per-channel statistics of a persisted {x.nbytes / 1e9:.2f} GB float32 Dask array "
        f"({name}, chunks of {chunks[0]} images), {args.workers} worker processes with one "
        f"thread each; median of {args.repeat} alternating runs.\n"
    )
    print("| what | seconds | GB/s | Dask's time / this |")
    print("|---|---:|---:|---:|")
    for label, seconds in (
        ("`numbabn.dask.channel_stats(x)`", ours_s),
        ("`dask.compute(x.mean(axes), x.var(axes))`", theirs_s),
    ):
        print(
            f"| {label} | {seconds:.3f} | {x.nbytes / seconds / 1e9:.1f} | "
            f"{theirs_s / seconds:.2f} |"
        )
    print(
        f"\nLargest difference from Dask's results: mean {np.abs(stats.mean - mean).max():.2e}, "
        f"variance {np.abs(stats.var - var).max():.2e}."
    )


if __name__ == "__main__":
    main()
