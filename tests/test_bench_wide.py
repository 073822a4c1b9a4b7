"""The wide-matrix table of the bench (``tools.bench.wide``)."""

from __future__ import annotations

import numba
import pytest

from tools.bench import small_calls, wide


def test_wide_cases_sweep_the_channels_at_both_sizes():
    shapes = {case.shape for case in wide.WIDE_CASES}
    assert {c for _, c in shapes} == {16, 64, 256, 1024, 4096, 8192}
    assert {n * c for n, c in shapes} == {1 << 16, 1 << 22}
    assert len(shapes) == 12


def test_wide_table_runs_on_a_tiny_case():
    """Every call runs beside PyTorch's and the NumPy floor, and the table reports them."""
    pytest.importorskip("torch")
    cases = [small_calls.SmallCase("BatchNorm1d", (8, 4))]
    table = small_calls.measure_small(
        1, numba.get_num_threads(), True, cases, progress=False, multiply=True
    )
    assert "multiply" in table["results"][0]["seconds"]
    markdown = wide.wide_markdown(table)
    row = next(line for line in markdown.splitlines() if line.startswith("| 8 | 4 |"))
    assert row.count("|") == 14  # 13 cells: N, C, 3 passes x 3, multiply, eval / multiply
