"""The user-facing commands run end to end: the demo and the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark lives in tools/, which runs from the checkout's root.
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_and_checks_itself():
    result = subprocess.run(
        [sys.executable, "-m", "numbabn"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |numbabn - NumPy float64 computation|" in result.stdout
    assert result.stdout.rstrip().endswith("ok")


@pytest.mark.slow
def test_benchmark_command_quick(tmp_path):
    command = [
        sys.executable, "-m", "tools.bench", "--quick", "--repeat", "2",
        "--no-startup", "--output", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    titles = (
        "Train forward",
        "Backward",
        "Eval forward",
        "Peak memory",
        "relu(bn",
        "Mixed layouts",
        "Small calls",
        "one-call floor",
    )
    for title in titles:
        assert title in result.stdout
    saved = json.loads((tmp_path / "cpu.json").read_text())
    assert len(saved["results"]) == 4
    assert all(case["seconds"]["numbabn_forward"] > 0 for case in saved["results"])
    assert "32x64x56x56 bfloat16" in {case["case"] for case in saved["results"]}
    assert "| 32x64x56x56 bfloat16 |" in result.stdout


@pytest.mark.slow
def test_gpu_benchmark_command_runs_in_the_simulator(tmp_path):
    command = [
        sys.executable, "-m", "tools.bench", "--device", "cuda", "--no-torch",
        "--repeat", "1", "--output", str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=environment, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| 2x3x4x4 float32 |" in result.stdout
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["results"][0]["seconds"]["numbabn_forward"] > 0
