"""Time a fresh process from start to its first forward + backward."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

_SCRIPT = """
import numpy as np
import numbabn as nbn
x = np.random.default_rng(0).standard_normal((8, 64, 28, 28), dtype=np.float32)
bn = nbn.BatchNorm2d(64)
bn.backward(np.ones_like(bn(x)))
"""


def _run(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _SCRIPT], env=env, check=True)
    return time.perf_counter() - start


def startup_seconds() -> dict[str, float]:
    """Seconds with Numba's cache warm (best of 3) and with an empty cache directory."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        cold = _run(env)
        warm = min(_run(env) for _ in range(3))
    return {"warm": warm, "cold": cold}
