"""Timing and peak-memory helpers."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import numpy as np

# A sample runs the function enough times to last at least this long.
_MIN_SAMPLE_SECONDS = 2e-3


def median_seconds(func: Callable[[], object], repeat: int) -> float:
    """Median wall time of one call of ``func`` over ``repeat`` samples (after a warm-up)."""
    start = time.perf_counter()
    func()
    single = time.perf_counter() - start
    calls = max(1, int(_MIN_SAMPLE_SECONDS / max(single, 1e-9)))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            func()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


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
