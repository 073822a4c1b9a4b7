"""Soak: many mixed batch-norm calls from several threads; memory, threads and fds stay flat.

``python tests/soak_workload.py --calls N --threads T`` runs ``N`` calls spread
over ``T`` Python threads. Each thread owns its modules (modules are not
thread-safe; separate modules used at once must be) and cycles through a mix of
cases: BatchNorm1d/2d/3d, float32 and float64, contiguous, channels-last and
sliced inputs, ``out=`` buffers and fresh outputs, train and eval, backward,
fused ReLU with and without a residual, the functional API, small tensors (the
serial kernels) and tensors of at least 128 Ki elements (the threaded kernels).
A call is one case: a forward, and its backward where the case has one.

The calls run in segments; between segments every worker thread waits, and the
resident set size (RSS), the bytes malloc has handed out and not had back (the
heap in use, from glibc's ``mallinfo2``), the process's thread count and its
open file descriptors are read from ``/proc/self`` and libc. The first calls
are the warm-up (every case compiles and every allocator arena fills); after
it, for RSS and for the heap in use:

- growth: the median of the last quarter of the samples minus the median of
  the first quarter stays below ``--max-growth-mb``;
- trend: the least-squares slope over the samples, times the calls after
  warm-up, stays below ``--max-growth-mb`` too (a slow leak shows as a slope
  before it shows as a jump);

and the thread and fd counts stay those right after warm-up. RSS is what the
user sees; the heap in use is blind to the allocator keeping freed memory, so
a leak shows there plainly even when fragmentation makes RSS creep.

Prints a progress line per segment, then a summary, and exits with status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import numbabn as nbn
from numbabn import functional as F
from numbabn._cpu.backend import PARALLEL_MIN_ELEMENTS

# -- /proc readings ---------------------------------------------------------------------


def _status_field(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {name} in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process."""
    return _status_field("VmRSS") * 1024


def thread_count() -> int:
    """Threads of this process (Python's and Numba's workers alike)."""
    return _status_field("Threads")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and newer
    except (AttributeError, OSError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (None without glibc's mallinfo2).

    Unlike RSS, this excludes memory that free() returned but the allocator
    keeps: a leak of malloc'd memory (NumPy data, Numba's arrays) shows here
    even when RSS is blurred by the allocator's arenas.
    """
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


# -- inputs in several layouts ----------------------------------------------------------


def make_input(
    rng: np.random.Generator, shape: tuple[int, ...], layout: str, dtype: Any
) -> np.ndarray:
    """Normal data of logical ``shape`` laid out as ``layout`` (a view, never a copy)."""
    ndim = len(shape)
    if layout == "contiguous":
        base, view = shape, lambda a: a
    elif layout == "channels_last":  # (N, *spatial, C) in memory
        base = (shape[0], *shape[2:], shape[1])
        order = (0, ndim - 1, *range(1, ndim - 1))
        view = lambda a: a.transpose(order)  # noqa: E731
    elif layout == "batch_slice":  # x[::2]
        base, view = (2 * shape[0], *shape[1:]), lambda a: a[::2]
    elif layout == "channel_slice":  # x[:, ::2]
        base, view = (shape[0], 2 * shape[1], *shape[2:]), lambda a: a[:, ::2]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    x = view((rng.standard_normal(base) * 2.0 + 1.0).astype(dtype))
    assert x.shape == shape
    return x


# -- the cases --------------------------------------------------------------------------

MODULES = {3: nbn.BatchNorm1d, 2: nbn.BatchNorm1d, 4: nbn.BatchNorm2d, 5: nbn.BatchNorm3d}


class Case:
    """One kind of call on a module that only one thread uses.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the (fixed) input data.
    shape, layout, dtype
        The input's logical shape, memory layout and dtype.
    train : bool or None
        Training mode (True), eval mode (False), or alternate every call (None).
    backward : bool
        Also call backward with a fixed gradient.
    out : bool
        Write forward and backward results into buffers made once.
    activation : {None, "relu"}
        Fused activation of the module.
    residual : bool
        Pass a residual to the fused forward.
    functional : bool
        Call ``numbabn.functional.batch_norm`` instead of a module (no backward).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        shape: tuple[int, ...],
        layout: str = "contiguous",
        dtype: Any = np.float32,
        *,
        train: bool | None = True,
        backward: bool = True,
        out: bool = False,
        activation: str | None = None,
        residual: bool = False,
        functional: bool = False,
    ) -> None:
        self.name = (
            f"{'F' if functional else MODULES[len(shape)].__name__}{shape} {layout} "
            f"{np.dtype(dtype).name}{' relu' if activation else ''}{' +res' if residual else ''}"
            f"{' out=' if out else ''}"
        )
        self.x = make_input(rng, shape, layout, dtype)
        self.dy = make_input(rng, shape, "contiguous", dtype)
        self.residual = make_input(rng, shape, "contiguous", dtype) if residual else None
        self.module = MODULES[len(shape)](shape[1], dtype=dtype, activation=activation)
        self.train, self.backward, self.functional = train, backward, functional
        self.out = np.empty(shape, dtype) if out else None
        self.grad_out = np.empty(shape, dtype) if out and backward else None
        self.calls = 0

    @property
    def size(self) -> int:
        return self.x.size

    def __call__(self, check: bool) -> None:
        """One call; with ``check``, also assert the results are finite."""
        self.calls += 1
        training = self.calls % 2 == 1 if self.train is None else self.train
        module = self.module.train(training)
        if self.functional:
            y = F.batch_norm(
                self.x, module.running_mean, module.running_var, module.weight, module.bias,
                training=training, out=self.out,
            )  # fmt: skip
            results = [y]
        else:
            y = module(self.x, self.out, residual=self.residual)
            results = [y]
            if self.backward:
                grads = module.backward(self.dy, self.grad_out)
                results += list(grads) if isinstance(grads, tuple) else [grads]
                if self.calls % 4 == 0:
                    module.zero_grad()
        if check:
            for result in results:
                assert np.isfinite(result).all(), self.name


def make_cases(seed: int) -> list[Case]:
    """A thread's cases: small ones on the serial kernels, big ones on the threaded ones."""
    rng = np.random.default_rng(seed)
    big = PARALLEL_MIN_ELEMENTS
    cases = [
        # Small: the serial kernels.
        Case(rng, (8, 16, 8, 8), out=True),
        Case(rng, (4, 16, 6, 6), "channels_last", np.float64),
        Case(rng, (64, 32), train=False),
        Case(rng, (4, 8, 50), "batch_slice", np.float64, train=None),
        Case(rng, (2, 4, 4, 4, 4), activation="relu"),
        Case(rng, (4, 8, 5, 5), "channels_last", activation="relu", residual=True, out=True),
        Case(rng, (6, 12, 7), "channel_slice", np.float64, functional=True, train=None),
        # Big: the threaded kernels.
        Case(rng, (8, 16, 32, 32), out=True),
        Case(rng, (8, 8, 48, 48), "channels_last", np.float64),
        Case(rng, (4, 32, 32, 32), activation="relu", residual=True, train=None),
        Case(rng, (4, 16, 48, 48), "channel_slice", backward=False, out=True),
        Case(rng, (2, 4, 16, 32, 32), "channels_last", activation="relu", train=False),
    ]
    assert any(case.size >= big for case in cases) and any(case.size < big for case in cases)
    return cases


# -- the soak ---------------------------------------------------------------------------


class Workers:
    """One long-lived thread per case list, running the calls of one segment at a time.

    The threads live as long as the soak, so the thread count read between
    segments is the process's own (no thread still exiting after a join).
    """

    def __init__(self, all_cases: list[list[Case]]) -> None:
        self.all_cases = all_cases
        self.start_line = threading.Barrier(len(all_cases) + 1)
        self.finish_line = threading.Barrier(len(all_cases) + 1)
        self.calls, self.first, self.stop = 0, 0, False
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._work, args=(index,), daemon=True)
            for index in range(len(all_cases))
        ]
        for thread in self.threads:
            thread.start()

    def _work(self, index: int) -> None:
        cases, n_threads = self.all_cases[index], len(self.all_cases)
        while True:
            self.start_line.wait()
            if self.stop:
                return
            try:
                for call in range(index, self.calls, n_threads):
                    number = self.first + call
                    # Each thread cycles through its cases; every 50th call checks results.
                    cases[(number // n_threads) % len(cases)](check=number % 50 < n_threads)
            except BaseException as error:  # reported by the main thread
                self.errors.append(error)
            self.finish_line.wait()

    def run(self, calls: int, first: int) -> None:
        """Calls ``first`` to ``first + calls`` over all threads; raise what a thread raised."""
        self.calls, self.first = calls, first
        self.start_line.wait()
        self.finish_line.wait()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self.stop = True
        self.start_line.wait()
        for thread in self.threads:
            thread.join()


class Curve:
    """Samples of one quantity (bytes) against the calls made so far."""

    def __init__(self, name: str) -> None:
        self.name, self.calls, self.values = name, [], []

    def add(self, calls: int, value: int) -> None:
        self.calls.append(calls)
        self.values.append(value)

    def growth(self) -> float:
        """Median of the last quarter of the samples minus that of the first quarter."""
        values = np.array(self.values, float)
        quarter = max(1, len(values) // 4)
        return float(np.median(values[-quarter:]) - np.median(values[:quarter]))

    def slope(self) -> float:
        """Least-squares slope, in bytes per call."""
        if len(self.calls) < 2:
            return 0.0
        return float(np.polyfit(np.array(self.calls, float), np.array(self.values, float), 1)[0])

    def report(self, remaining: int) -> list[str]:
        mb = 1 / 2**20

        def at(fraction: float) -> float:
            return self.values[round(fraction * (len(self.values) - 1))] * mb

        return [
            f"  {self.name} after warm-up, 25%, 50%, 75%, end: {at(0):.1f}, {at(0.25):.1f}, "
            f"{at(0.5):.1f}, {at(0.75):.1f}, {at(1):.1f} MB "
            f"(min {min(self.values) * mb:.1f}, max {max(self.values) * mb:.1f})",
            f"  {self.name} growth (last quarter - first quarter, medians) "
            f"{self.growth() * mb:+.2f} MB; trend {self.slope():+.1f} B/call = "
            f"{self.slope() * remaining * mb:+.2f} MB over {remaining} calls",
        ]

    def failures(self, remaining: int, limit_mb: float) -> list[str]:
        mb = 1 / 2**20
        found = []
        if self.growth() * mb > limit_mb:
            found.append(f"{self.name} grew {self.growth() * mb:.2f} MB (limit {limit_mb})")
        if self.slope() * remaining * mb > limit_mb:
            trend = self.slope() * remaining * mb
            found.append(f"{self.name} trend {trend:.2f} MB (limit {limit_mb})")
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls in all (default 2000)")
    parser.add_argument("--threads", type=int, default=4, help="Python threads (default 4)")
    parser.add_argument(
        "--segments", type=int, default=40, help="RSS samples after warm-up (default 40)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="fraction of the calls for warm-up (0.1)"
    )
    parser.add_argument(
        "--max-growth-mb", type=float, default=4.0, help="RSS growth allowed after warm-up (4)"
    )
    parser.add_argument(
        "--inject-leak-kb",
        type=float,
        default=0.0,
        help="keep this many KB per call after warm-up (to see that the checks catch a leak)",
    )
    args = parser.parse_args(argv)
    mb = 1 / 2**20
    started = time.perf_counter()
    at_start = rss_bytes(), thread_count(), fd_count()

    all_cases = [make_cases(seed) for seed in range(args.threads)]
    n_cases = len(all_cases[0])
    workers = Workers(all_cases)
    # Warm-up: every case of every thread at least 4 times (a zero_grad cycle), and at
    # least --warmup of the calls.
    warmup = max(int(args.calls * args.warmup), 4 * n_cases * args.threads)
    if warmup >= args.calls:
        parser.error(f"--calls must exceed the warm-up, {warmup} calls")
    workers.run(warmup, 0)
    warm = rss_bytes(), thread_count(), fd_count()
    print(
        f"warm-up: {warmup} calls in {time.perf_counter() - started:.1f} s, "
        f"{args.threads} threads x {n_cases} cases; RSS {warm[0] * mb:.1f} MB, "
        f"threads {warm[1]}, fds {warm[2]}",
        flush=True,
    )

    remaining = args.calls - warmup
    boundaries = np.linspace(0, remaining, min(args.segments, remaining) + 1).astype(int)
    rss, heap = Curve("RSS"), Curve("heap in use")
    done, threads_seen, fds_seen = warmup, {warm[1]}, {warm[2]}
    leaked: list[bytearray] = []

    def sample() -> None:
        rss.add(done, rss_bytes())
        in_use = heap_bytes()
        if in_use is not None:
            heap.add(done, in_use)
        threads_seen.add(thread_count())
        fds_seen.add(fd_count())

    sample()
    for begin, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        workers.run(int(end - begin), done)
        if args.inject_leak_kb:
            leaked += [bytearray(int(args.inject_leak_kb * 1024)) for _ in range(end - begin)]
        done += int(end - begin)
        sample()
        print(
            f"calls {done}/{args.calls}  RSS {rss.values[-1] * mb:.1f} MB  "
            + (f"heap {heap.values[-1] * mb:.1f} MB  " if heap.values else "")
            + f"threads {thread_count()}  fds {fd_count()}  {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    end_state = rss_bytes(), thread_count(), fd_count()
    workers.close()

    curves = [rss, heap] if heap.values else [rss]
    print("summary:")
    print(f"  calls {args.calls} ({warmup} warm-up) on {args.threads} threads")
    print(f"  time {time.perf_counter() - started:.1f} s")
    print(f"  RSS start {at_start[0] * mb:.1f} MB, after warm-up {warm[0] * mb:.1f} MB")
    for curve in curves:
        print("\n".join(curve.report(remaining)))
    print(f"  threads start {at_start[1]}, after warm-up {warm[1]}, end {end_state[1]}")
    print(f"  fds start {at_start[2]}, after warm-up {warm[2]}, end {end_state[2]}")
    failures = [
        failure for curve in curves for failure in curve.failures(remaining, args.max_growth_mb)
    ]
    if end_state[1] != warm[1] or len(threads_seen) > 1:
        failures.append(f"thread count changed: {sorted(threads_seen)} then {end_state[1]}")
    if end_state[2] != warm[2] or len(fds_seen) > 1:
        failures.append(f"fd count changed: {sorted(fds_seen)} then {end_state[2]}")
    for failure in failures:
        print(f"  FAIL: {failure}")
    print("soak FAIL" if failures else "soak PASS", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
