"""The worker threads that split a kernel's items: coverage, errors, thread counts."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from numbabn._cpu.workers import run_items


def mark(hits: np.ndarray, start: int, stop: int) -> None:
    hits[start:stop] += 1


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_items", [1, 2, 7, 100])
def test_every_item_runs_exactly_once(threads, n_items):
    hits = np.zeros(n_items, np.int64)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        run_items(mark, n_items, hits)
    finally:
        numba.set_num_threads(previous)
    assert hits.tolist() == [1] * n_items


def fail_after_first(hits: np.ndarray, start: int, stop: int) -> None:
    if start > 0:
        raise ValueError(f"items {start}:{stop}")
    hits[start:stop] += 1


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two threads")
def test_a_worker_error_reaches_the_caller_after_all_ranges_finish():
    hits = np.zeros(10, np.int64)
    with pytest.raises(ValueError, match="items 5:10"):
        run_items(fail_after_first, 10, hits)
    assert hits.tolist() == [1] * 5 + [0] * 5
    run_items(mark, 10, hits)  # the workers still serve
    assert hits.tolist() == [2] * 5 + [1] * 5
