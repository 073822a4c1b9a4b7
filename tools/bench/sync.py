"""Cost of SyncBatchNorm's exchange: ``mpiexec -n 2 python -m tools.bench.sync``.

Times train forward + backward of SyncBatchNorm and of plain BatchNorm2d on the
same per-rank batch, side by side (their samples alternate), and prints the
difference (the collectives and merges) on rank 0. Every rank makes the same
number of calls per timing sample (the most any rank needs), as every
SyncBatchNorm call is a collective.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

import numbabn as nbn
from tools.bench.timing import _calls_per_sample

SHAPES = [(4, 64, 56, 56), (16, 256, 14, 14), (16, 2048, 7, 7), (2, 16, 8, 8)]


def agreed_median_seconds(
    comm: Any, funcs: Sequence[Callable[[], object]], repeat: int
) -> list[float]:
    """Median wall time of one call of each of ``funcs``, the same number of calls on every rank.

    Each rank sizes a sample from its own timing of each function; the ranks
    then take the largest count, so that they make the same calls (a rank that
    made fewer exchanges than the others would leave them waiting for ever).
    Samples of the functions alternate, so a slow spell of the machine hits all.
    """
    calls = [comm.allreduce(_calls_per_sample(func), op=MPI.MAX) for func in funcs]
    samples: list[list[float]] = [[] for _ in funcs]
    for _ in range(repeat):
        for func, count, taken in zip(funcs, calls, samples, strict=True):
            func()
            start = time.perf_counter()
            for _ in range(count):
                func()
            taken.append((time.perf_counter() - start) / count)
    return [float(np.median(taken)) for taken in samples]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.sync")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rows = []
    for shape in SHAPES:
        x = np.random.default_rng(comm.Get_rank()).standard_normal(shape, dtype=np.float32)
        dy = np.ones_like(x)
        plain = nbn.BatchNorm2d(shape[1])
        synced = nbn.SyncBatchNorm(shape[1], comm=comm)

        def step(
            module: nbn.BatchNorm2d | nbn.SyncBatchNorm, x: np.ndarray = x, dy: np.ndarray = dy
        ) -> None:
            module(x)
            module.backward(dy)

        comm.Barrier()
        steps = [functools.partial(step, module) for module in (plain, synced)]
        medians = agreed_median_seconds(comm, steps, args.repeat)
        # The slowest rank sets the pace.
        rows.append((shape, *(max(comm.allgather(seconds)) for seconds in medians)))
    if comm.Get_rank() == 0:
        print(f"SyncBatchNorm exchange cost, {comm.Get_size()} ranks, per-rank batch shapes")
        print(
            "| per-rank shape | BatchNorm2d fwd+bwd ms | SyncBatchNorm ms | exchange ms | ratio |"
        )
        print("|---|---:|---:|---:|---:|")
        for shape, plain_s, sync_s in rows:
            name = "x".join(map(str, shape))
            print(
                f"| {name} | {plain_s * 1e3:.3f} | {sync_s * 1e3:.3f} | "
                f"{(sync_s - plain_s) * 1e3:.3f} | {sync_s / plain_s:.2f} |"
            )


if __name__ == "__main__":
    main()
