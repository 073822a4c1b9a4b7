"""Compile every CPU kernel specialisation into Numba's on-disk cache ahead of time.

``python -m numbabn warmup [--dtype float32 float64 bfloat16 float16]`` runs this module: for
container image builds and cluster job prologues, so that jobs start with every
kernel they can need already compiled.

Each kernel has two compiled variants per dtype (every operand C-contiguous, or
any other mix of layouts), and the serial and
threaded paths have kernels of their own. Rather than listing those signatures
by hand (they would drift from the code), the warm-up drives the public API over
a small list of representative calls, one per code path and operand kind, on
tiny arrays (below and above :data:`numbabn._tunables.PARALLEL_MIN_ELEMENTS`).

Concurrent warm-ups on one cache (``mpiexec -n 64 python -m numbabn warmup``)
take turns on a lock file in the cache directory: the first compiles, the others
then load what it saved instead of compiling the same kernels at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from numbabn import _source_stamp, functional
from numbabn._dispatch import host_backend
from numbabn._file_lock import exclusive
from numbabn._layouts import LAYOUTS_ANY, LAYOUTS_SPATIAL, make_layout
from numbabn._tunables import PARALLEL_MIN_ELEMENTS
from numbabn._validation import PARAM_DTYPES
from numbabn.modules import BatchNorm1d, BatchNorm2d
from numbabn.stats import ChannelStats

__all__ = [
    "CacheNotWritableError", "WarmupReport", "cache_dir", "compile_counts", "main", "warmup",
]  # fmt: skip

DTYPES = ("float32", "float64")
# 16-bit float input (with float32 modules, as mixed precision has them); bfloat16 needs
# the ml_dtypes package.
HALF_DTYPES = ("bfloat16", "float16")
_LOCK_NAME = "numbabn-warmup.lock"

# Channel count and spatial size of the two tensor sizes: one-call serial kernels
# below PARALLEL_MIN_ELEMENTS elements, threaded drivers above.
_CHANNELS = 8
_SIZES = {"serial": (2, 8), "threaded": (2, 96)}
assert _SIZES["serial"][0] * _CHANNELS * _SIZES["serial"][1] ** 2 < PARALLEL_MIN_ELEMENTS
assert _SIZES["threaded"][0] * _CHANNELS * _SIZES["threaded"][1] ** 2 >= PARALLEL_MIN_ELEMENTS


def compile_counts() -> tuple[int, int]:
    """``(compiled, loaded)``: signatures compiled and loaded from the cache so far.

    Summed over the CPU backend's dispatchers in this process (Numba's cache
    misses and hits).
    """
    return host_backend().compile_counts()


def cache_dir() -> str:
    """The directory where Numba caches the CPU kernels (created if missing).

    A folder named after the digest of the sources, in ``NUMBA_CACHE_DIR`` when
    set, else in the user's cache directory (``~/.cache/numbabn`` on Linux).
    """
    return host_backend().cache_dir()


# -- the representative calls -----------------------------------------------------------


def _shape(size: str, ndim: int = 4) -> tuple[int, ...]:
    n, side = _SIZES[size]
    if ndim == 2:
        return (n * side * side, _CHANNELS)
    if ndim == 3:
        return (n, _CHANNELS, side * side)
    return (n, _CHANNELS, side, side)


# Memory layouts of the inputs (and gradients, residuals, outputs), read-only ones
# included: once the two variants exist every other kind reuses them, which the
# warm-up's own tests check.
_READ_ONLY = ("read_only", "broadcast")
_KINDS = LAYOUTS_ANY + LAYOUTS_SPATIAL + _READ_ONLY


def _make(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, kind: str) -> Any:
    """Random data of logical ``shape`` whose memory layout is ``kind``."""

    def data(logical: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal(logical).astype(dtype)

    if kind == "read_only":
        array = data(shape)
        array.setflags(write=False)
        return array
    if kind == "broadcast":  # read-only, with a zero stride
        return np.broadcast_to(data((1, *shape[1:])), shape)
    return make_layout(data, shape, kind)


def _module_steps(
    module: Any, x: Any, dy: Any, residual: Any | None = None, out: Any | None = None
) -> None:
    """Training forward and backward, then eval forward and backward."""
    for training in (True, False):
        module.train(training)
        module(x, out, residual=residual)
        module.backward(dy)


def _plain(dtype: np.dtype, size: str, kind: str) -> None:
    rng = np.random.default_rng(0)
    shape = _shape(size)
    x = _make(rng, shape, dtype, kind)
    bn = BatchNorm2d(_CHANNELS, dtype=PARAM_DTYPES[dtype])
    # The gradient laid out like the input, and a fresh C-contiguous one.
    for dy_kind in dict.fromkeys((kind, "contiguous")):
        _module_steps(bn, x, _make(rng, shape, dtype, dy_kind))


def _fused(dtype: np.dtype, size: str, kind: str) -> None:
    rng = np.random.default_rng(0)
    shape = _shape(size)
    x = _make(rng, shape, dtype, kind)
    bn = BatchNorm2d(_CHANNELS, activation="relu", dtype=PARAM_DTYPES[dtype])
    for other in dict.fromkeys((kind, "contiguous")):
        dy = _make(rng, shape, dtype, other)
        _module_steps(bn, x, dy)
        _module_steps(bn, x, dy, residual=_make(rng, shape, dtype, other))


def _in_place(dtype: np.dtype, size: str, kind: str) -> None:
    """``out=`` arrays laid out like the input, in the forward and the backward."""
    rng = np.random.default_rng(0)
    shape = _shape(size)
    x = _make(rng, shape, dtype, kind)
    for activation in (None, "relu"):
        bn = BatchNorm2d(_CHANNELS, activation=activation, dtype=PARAM_DTYPES[dtype])
        for training in (True, False):
            bn.train(training)
            bn(x, _make(rng, shape, dtype, kind))
            bn.backward(_make(rng, shape, dtype, kind), _make(rng, shape, dtype, kind))


def _other_ranks(dtype: np.dtype, size: str) -> None:
    """2-D ``(N, C)`` and 3-D ``(N, C, L)`` input, as ``BatchNorm1d`` takes it."""
    rng = np.random.default_rng(0)
    for ndim in (2, 3):
        shape = _shape(size, ndim)
        bn = BatchNorm1d(_CHANNELS, dtype=PARAM_DTYPES[dtype])
        for kind in LAYOUTS_ANY + (LAYOUTS_SPATIAL[:1] if ndim == 3 else ()):
            x = _make(rng, shape, dtype, kind)
            for dy_kind in dict.fromkeys((kind, "contiguous")):
                _module_steps(bn, x, _make(rng, shape, dtype, dy_kind))


def _functional(dtype: np.dtype, size: str) -> None:
    """The functional API, ``ChannelStats`` and ``SyncBatchNorm``'s passes.

    The functional calls go without parameters or running statistics; the
    passes of ``SyncBatchNorm``'s exchange run here on one process.
    """
    rng = np.random.default_rng(0)
    shape = _shape(size)
    for kind in ("contiguous", "crop"):
        x = _make(rng, shape, dtype, kind)
        dy = _make(rng, shape, dtype, "contiguous")
        for activation in (None, "relu"):
            y, saved = functional.batch_norm_forward(
                x, None, None, training=True, activation=activation
            )
            functional.batch_norm_backward(dy, x, saved, activation=activation)
            functional.batch_norm_backward(
                dy, x, saved, np.ones(_CHANNELS, PARAM_DTYPES[dtype]), activation=activation
            )
        # SyncBatchNorm and numbabn.dask: moments, their merges, the coefficients with and
        # without running statistics, affine, grad_sums and grad_input_from_sums.
        stats = ChannelStats(_CHANNELS).update(x)
        stats = ChannelStats.from_rows(ChannelStats.row(stats.count, stats.mean, stats.m2)[None])
        stats.merge(stats)
        weight = np.ones(_CHANNELS, PARAM_DTYPES[dtype])
        tracked = (np.zeros(_CHANNELS, weight.dtype), np.ones(_CHANNELS, weight.dtype))
        backend = host_backend()
        for running_mean, running_var in (tracked, (None, None)):
            invstd, scale, shift = backend.train_coefficients(
                stats.mean, stats.m2, stats.count, weight, weight, 1e-5, running_mean,
                running_var, 0.1,
            )  # fmt: skip
        backend.affine(x, stats.mean, scale, shift, None)
        sums = backend.grad_sums(dy, x, stats.mean)
        count = x.size // _CHANNELS
        backend.grad_input_from_sums(dy, x, stats.mean, invstd, weight, sums, count, None)


@dataclass(frozen=True)
class _Case:
    label: str
    run: Callable[[np.dtype, str], None]


def _cases() -> list[_Case]:
    cases = [
        _Case(f"forward and backward ({kind})", functools.partial(_plain, kind=kind))
        for kind in _KINDS
    ]
    cases += [
        _Case(f"fused ReLU and residual ({kind})", functools.partial(_fused, kind=kind))
        for kind in _KINDS
    ]
    cases += [
        _Case(f"out= buffers ({kind})", functools.partial(_in_place, kind=kind))
        for kind in LAYOUTS_ANY + LAYOUTS_SPATIAL
    ]
    cases.append(_Case("2-D and 3-D input", _other_ranks))
    cases.append(_Case("functional API, ChannelStats, SyncBatchNorm passes", _functional))
    return cases


# -- driver --------------------------------------------------------------------------------


@dataclass
class WarmupReport:
    """What :func:`warmup` did.

    Attributes
    ----------
    seconds : dict of str to float
        Wall time per dtype.
    total_seconds : float
        Wall time of the whole warm-up, waiting for the lock included.
    compiled, loaded : int
        Kernel signatures compiled (and saved) and signatures loaded from the cache.
    cache_dir : str
        The cache directory in use.
    waited_seconds : float
        Time spent waiting for another process's warm-up on the same cache.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    compiled: int = 0
    loaded: int = 0
    cache_dir: str = ""
    waited_seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for people: time per dtype, total, counts and the cache directory."""
        lines = [f"  {dtype}: {seconds:.1f} s" for dtype, seconds in self.seconds.items()]
        if self.waited_seconds >= 0.1:
            lines.append(f"  waited {self.waited_seconds:.1f} s for another warm-up")
        lines.append(
            f"  total {self.total_seconds:.1f} s: {self.compiled} kernel signatures compiled, "
            f"{self.loaded} loaded from the cache"
        )
        lines.append(f"  cache: {self.cache_dir}")
        return "warm-up done\n" + "\n".join(lines)


class _TextProgress:
    """One line per step on ``stream``, rewritten in place on a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.done = 0

    def start(self, label: str) -> None:
        pass

    def finish(self, label: str, seconds: float) -> None:
        self.done += 1
        width = len(str(self.total))
        line = f"[{self.done:>{width}}/{self.total}] {label} {seconds:.1f} s"
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _TqdmProgress(_TextProgress):
    """A tqdm bar (tqdm is not a dependency: used when it is installed)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        super().__init__(total, stream)
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=stream, unit="step")

    def start(self, label: str) -> None:
        self.bar.set_description_str(label)

    def finish(self, label: str, seconds: float) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _progress(total: int, stream: TextIO) -> _TextProgress:
    try:
        return _TqdmProgress(total, stream)
    except ImportError:
        return _TextProgress(total, stream)


def warmup(
    dtypes: Sequence[str] = DTYPES, progress: bool = True, stream: TextIO | None = None
) -> WarmupReport:
    """Compile (or load) every CPU kernel specialisation the given dtypes can need.

    Parameters
    ----------
    dtypes : sequence of {"float32", "float64", "bfloat16", "float16"}
        Input dtypes to warm up (16-bit floats with float32 modules).
    progress : bool
        Show a progress bar (tqdm when installed, else one line per step).
    stream : file, optional
        Where the progress goes; ``sys.stderr`` by default.

    Returns
    -------
    WarmupReport
        Times per dtype, counts of compiled and loaded signatures, the cache directory.
    """
    for name in dtypes:
        if name not in DTYPES + HALF_DTYPES:
            choices = ", ".join(DTYPES + HALF_DTYPES)
            raise ValueError(f"dtype must be one of {choices}, got {name!r}")
    stream = sys.stderr if stream is None else stream
    start = time.perf_counter()
    with contextlib.ExitStack() as held:
        try:
            report = WarmupReport(cache_dir=cache_dir())
            held.enter_context(exclusive(os.path.join(report.cache_dir, _LOCK_NAME)))
        except OSError as error:
            raise CacheNotWritableError(
                f"cannot write the kernel cache in {error.filename} ({error.strerror}). {_REMEDY}"
            ) from error
        report.waited_seconds = time.perf_counter() - start
        _run_steps(dtypes, report, progress, stream)
    report.total_seconds = time.perf_counter() - start
    if _source_stamp.save_failed():
        raise CacheNotWritableError(
            f"the warm-up could not save every kernel in {report.cache_dir} (the warning "
            f"above says why). {_REMEDY}"
        )
    return report


class CacheNotWritableError(OSError):
    """The warm-up cannot save compiled kernels into the cache."""


_REMEDY = "Set NUMBA_CACHE_DIR to a writable directory with room for a few megabytes."


def _run_steps(dtypes: Sequence[str], report: WarmupReport, progress: bool, stream: TextIO) -> None:
    """Run every representative call for ``dtypes``; add their times and counts to ``report``."""
    before = compile_counts()
    steps = [(name, size, case) for name in dtypes for size in _SIZES for case in _cases()]
    bar = _progress(len(steps), stream) if progress else None
    try:
        for name, size, case in steps:
            label = f"{name} {size} {case.label}"
            if bar is not None:
                bar.start(label)
            step_start = time.perf_counter()
            case.run(_dtype(name), size)
            seconds = time.perf_counter() - step_start
            report.seconds[name] = report.seconds.get(name, 0.0) + seconds
            if bar is not None:
                bar.finish(label, seconds)
    finally:
        if bar is not None:
            bar.close()
    after = compile_counts()
    report.compiled, report.loaded = after[0] - before[0], after[1] - before[1]


def _dtype(name: str) -> np.dtype:
    """The NumPy dtype named ``name``; bfloat16 is ``ml_dtypes``'."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``warmup`` subcommand's options."""
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=DTYPES + HALF_DTYPES,
        default=list(DTYPES),
        help="input dtypes to compile the kernels for (default: float32 and float64)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")


def main(args: argparse.Namespace) -> None:
    """Run the warm-up the parsed command line asks for and print its summary."""
    try:
        report = warmup(tuple(dict.fromkeys(args.dtype)), progress=not args.quiet)
    except CacheNotWritableError as error:
        sys.exit(f"numbabn warmup: {error}")
    print(report.summary())
