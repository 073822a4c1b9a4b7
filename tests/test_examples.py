"""The example scripts run end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_digits(tmp_path):
    output = tmp_path / "curves.png"
    command = [
        sys.executable, str(EXAMPLES / "train_digits.py"),
        "--epochs", "3", "--seed", "0", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.read_bytes().startswith(PNG_SIGNATURE)
    assert len(re.findall(r"epoch +\d+ +train loss", result.stdout)) == 2 * 3
    summary = re.search(
        r"^final: loss with BN ([\d.]+), without BN ([\d.]+);", result.stdout, re.MULTILINE
    )
    assert summary, result.stdout
    with_bn, without_bn = (float(value) for value in summary.groups())
    assert with_bn < without_bn, summary.group(0)


@pytest.mark.slow
def test_dask_precise_bn(tmp_path):
    pytest.importorskip("distributed")
    pytest.importorskip("zarr")
    store = tmp_path / "features.zarr"
    command = [
        sys.executable, str(EXAMPLES / "dask_precise_bn.py"), "--store", str(store),
        "--batches", "4",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"exact statistics of 100352 values per channel", result.stdout)
    assert re.search(r"normalised copy: mean [-+][\d.e-]+, std 1\.0000", result.stdout)
    assert (store / "normalised").is_dir()
