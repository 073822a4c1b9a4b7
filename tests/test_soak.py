"""Soak: 2,000 mixed calls from 4 threads with flat memory and no thread or fd growth.

``soak_workload.py`` runs in a subprocess (a fresh process: its RSS is the
workload's own). ``make soak`` runs the same workload with 50,000 calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WORKLOAD = HERE / "soak_workload.py"
# Compiling every kernel variant from a cold cache takes minutes on a busy machine;
# the calls themselves take seconds.
TIMEOUT = 900

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads RSS, threads and fds from /proc"
)


def soak(*args: str) -> subprocess.CompletedProcess[str]:
    # Numba's own thread count, so that the threaded kernels run on several threads.
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_NUM_THREADS"}
    command = [sys.executable, str(WORKLOAD), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.mark.slow
def test_soak_memory_threads_and_fds_stay_flat():
    result = soak("--calls", "2000", "--threads", "4")
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    assert "soak PASS" in result.stdout, printed
    assert "RSS after warm-up, 25%, 50%, 75%, end" in result.stdout, printed


@pytest.mark.slow
def test_soak_catches_a_leak():
    # 8 KB kept per call after warm-up: 14 MB over 1,800 calls, past the 4 MB limit.
    result = soak("--calls", "2000", "--threads", "2", "--inject-leak-kb", "8")
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed
    for failure in ("RSS grew", "RSS trend", "heap in use grew", "heap in use trend"):
        assert f"FAIL: {failure}" in result.stdout, printed
    assert "thread count changed" not in result.stdout, printed
