"""The benchmark's helpers: sampling in rounds, and the machine description."""

from __future__ import annotations

import os
import time

from numbabn.bench import machine
from numbabn.bench.timing import interleaved_medians


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


def test_machine_description_names_the_cores():
    assert f"{os.cpu_count()} cores" in machine.describe()


def test_cache_sizes_read_in_binary_units():
    assert machine._readable("32768K") == "32 MiB"
    assert machine._readable("512K") == "512 KiB"
    assert machine._readable("1.5M") == "1.5M"
