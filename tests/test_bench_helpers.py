"""The benchmark's helpers: sampling in rounds, the machine description, the tables' code."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import numbabn
from tools.bench import layouts, machine, small_calls, startup
from tools.bench.cases import Case
from tools.bench.measure import measure_case
from tools.bench.timing import interleaved_medians


def test_interleaved_medians_samples_each_function_every_round():
    order: list[str] = []

    def slow(name: str):
        def call() -> None:
            order.append(name)
            time.sleep(3e-3)  # longer than a sample: one timed call per sample

        return call

    medians = interleaved_medians({"a": slow("a"), "b": slow("b")}, repeat=3)
    assert list(medians) == ["a", "b"]
    assert all(value >= 3e-3 for value in medians.values())
    # Two calibration calls each, then per round an untimed and a timed call of each in turn.
    assert order == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3


@pytest.mark.parametrize(("dtype", "numpy_peer"), [("float32", True), ("float16", False)])
def test_numpy_peer_only_for_float32_and_float64(dtype, numpy_peer):
    """NumPy's 16-bit arithmetic is slow and overflows its sums: no NumPy peer for float16."""
    result = measure_case(Case((2, 3, 4, 4), dtype), repeat=1, threads=1, with_torch=False)
    assert ("numpy_forward" in result["seconds"]) == numpy_peer
    assert "numbabn_forward_backward_out" in result["seconds"]


def test_machine_description_names_the_cores():
    assert f"{os.cpu_count()} cores" in machine.describe()


def test_cache_sizes_read_in_binary_units():
    assert machine._readable("32768K") == "32 MiB"
    assert machine._readable("512K") == "512 KiB"
    assert machine._readable("1.5M") == "1.5M"


def test_startup_table_lists_each_dtype_and_size():
    per_size = {"cold": 2.0, "warm": 0.2, "import": 0.5}
    figures = {
        "float32": {"small": per_size, "large": per_size, "warmup": 9.0},
        "float64": {"small": per_size, "large": per_size, "warmup": None},
    }
    table = startup.startup_markdown(figures)
    rows = [line for line in table.splitlines() if line.startswith("| float")]
    assert len(rows) == 4
    assert rows[0].endswith("| 9.0 |") and rows[2].endswith("|  |")


@pytest.mark.slow
def test_first_call_seconds_runs_a_fresh_process():
    figures = startup.first_call_seconds((2, 3, 4, 4), "float64", dict(os.environ))
    assert set(figures) == {"import", "call"}
    assert all(seconds > 0 for seconds in figures.values())


def test_layout_table_marks_each_target():
    seconds = {case.name: 1e-3 for case in layouts.LAYOUT_CASES}
    seconds["x NCHW, dy channels-last"] = 2e-3
    rows = {row["case"]: row for row in layouts.rows_from_seconds(seconds)}
    assert rows["x, dy channels-last"]["met"] is True
    assert rows["x NCHW, dy channels-last"]["ratio"] == 2.0
    assert rows["x NCHW, dy channels-last"]["met"] is False
    table = layouts.layouts_markdown({"shape": [2, 3, 4, 4], "rows": list(rows.values())})
    assert "| **no** |" in table
    assert rows["x NCHW, dy channels-last"]["torch_ratio"] is None  # no PyTorch times given


def test_layout_table_gives_pytorch_its_own_ratios():
    seconds = {case.name: 1e-3 for case in layouts.LAYOUT_CASES}
    seconds.update({"torch: " + case.name: 4e-3 for case in layouts.LAYOUT_CASES})
    seconds["torch: x NCHW, dy channels-last"] = 6e-3
    rows = {row["case"]: row for row in layouts.rows_from_seconds(seconds)}
    assert rows["x NCHW, dy channels-last"]["torch_ratio"] == 1.5
    assert rows["x, dy NCHW"]["torch_ratio"] is None  # a row compared with nothing
    table = layouts.layouts_markdown({"shape": [2, 3, 4, 4], "rows": list(rows.values())})
    assert "| 6.00 | 1.50 |" in table


def test_pytorch_layout_steps_run():
    pytest.importorskip("torch")
    for case in layouts.LAYOUT_CASES:
        layouts.make_torch_step(case, (2, 3, 4, 4), 1)()


def test_small_calls_table_runs_on_a_tiny_case():
    """Every call of the table runs, beside PyTorch's where it is installed, and is reported."""
    torch = pytest.importorskip("torch")
    cases = [small_calls.SmallCase("BatchNorm1d", (4, 3)), small_calls.FLOOR_CASE]
    threads = torch.get_num_threads()  # left as it is for the other tests
    small = small_calls.measure_small(1, threads, True, cases, progress=False, runs=2)
    keys = {f"{library}_{key}" for library in ("numbabn", "torch") for key in small_calls.PASSES}
    assert set(small["results"][0]["seconds"]) == keys
    assert set(small["results"][1]["seconds"]) == keys | {"floor_forward"}
    assert small["calls"]["all"] >= small["calls"]["python"] > 0
    table = small_calls.small_markdown(small)
    assert "| BatchNorm1d | 4x3 |" in table
    assert "| one-call floor | 2x16x8x8 |" in table and "numbabn / floor:" in table
    assert "PyTorch's time over numbabn's" in table


def test_one_call_floor_is_numbabns_training_forward():
    x = small_calls.FLOOR_CASE.make(0)
    floor = small_calls.Floor(x)
    bn = numbabn.BatchNorm2d(x.shape[1], momentum=small_calls.MOMENTUM)
    for _ in range(2):  # the running statistics update on top of the last
        floor()
        y = bn(x)
    np.testing.assert_allclose(floor.out.reshape(x.shape), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(floor.running_mean, bn.running_mean, rtol=1e-6)
    np.testing.assert_allclose(floor.running_var, bn.running_var, rtol=1e-6)
