"""Timing and peak-memory helpers."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import numpy as np

# A sample runs the function enough times to last at least this long.
_MIN_SAMPLE_SECONDS = 2e-3


def _calls_per_sample(func: Callable[[], object]) -> int:
    """Calls of ``func`` that last about ``_MIN_SAMPLE_SECONDS`` (after a warm-up call)."""
    func()
    start = time.perf_counter()
    func()
    single = time.perf_counter() - start
    return max(1, int(_MIN_SAMPLE_SECONDS / max(single, 1e-9)))


def interleaved_medians(funcs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of one call of each function, sampled in turn.

    Each of the ``repeat`` rounds takes one sample of every function, so a slow
    spell on a shared machine falls on all of them alike instead of on whichever
    ran then, and ratios between them stay fair. An untimed call before each
    sample brings that function's buffers back into the caches the previous
    function used.
    """
    calls = {name: _calls_per_sample(func) for name, func in funcs.items()}
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeat):
        for name, func in funcs.items():
            func()
            start = time.perf_counter()
            for _ in range(calls[name]):
                func()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: float(np.median(values)) for name, values in samples.items()}


def median_seconds(func: Callable[[], object], repeat: int) -> float:
    """Median wall time of one call of ``func`` over ``repeat`` samples (after a warm-up)."""
    return interleaved_medians({"func": func}, repeat)["func"]


def peak_bytes(func: Callable[[], object]) -> int:
    """Peak memory traced (NumPy allocations included) above the level before the call."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = func()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - before
