"""The eval forward's arithmetic floor in the bench (``tools.bench.eval_floor``)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from tools.bench import eval_floor
from tools.bench.small_calls import SmallCase


@pytest.mark.parametrize("shape", [(4, 3, 5), (6, 4, 1)])
def test_the_floors_compute_the_eval_forward(shape):
    """The float64 floor is numbabn's arithmetic (its output within 1 ulp of numbabn's eval)
    and the float32 floor PyTorch's (within float32 rounding of the multiply-add)."""
    case = SmallCase("BatchNorm1d", shape)
    x = case.make()
    calls = eval_floor.floor_calls(case, x, with_torch=False)
    expected = calls["numbabn"]()
    np.testing.assert_array_max_ulp(calls["floor64"](), expected, maxulp=1)
    np.testing.assert_allclose(calls["floor32"](), expected, rtol=1e-5, atol=1e-5)


def test_floor_table_runs_on_a_tiny_case():
    """Every call is timed, and the table reports the ratios."""
    with_torch = pytest.importorskip("torch") is not None
    table = eval_floor.measure_floor(
        1, numba.get_num_threads(), with_torch, cases=[SmallCase("BatchNorm2d", (2, 3, 4, 4))]
    )
    assert set(table["rows"][0]) >= {"numbabn", "numbabn_out", "torch", "floor64", "floor32"}
    markdown = eval_floor.floor_markdown(table)
    row = next(line for line in markdown.splitlines() if line.startswith("| BatchNorm2d 2x3x4x4"))
    assert row.count("|") == 12  # 11 cells
