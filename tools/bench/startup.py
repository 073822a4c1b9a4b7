"""Cold and warm start: a fresh process to its first training forward + backward.

Each cold figure comes from a process with an empty Numba cache directory of
its own, so it includes compiling every kernel the call needs; the warm ones
rerun the same command on the cache the cold run filled. The whole warm-up of a
dtype (``python -m numbabn warmup``) into an empty cache is the time to compile
every kernel that dtype can need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

# The one-call serial path, and the threaded one.
SIZES = {"small": (2, 16, 8, 8), "large": (32, 64, 56, 56)}
DTYPES = ("float32", "float64")

_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import numbabn as nbn
imported = time.perf_counter()
shape, dtype = tuple(json.loads(sys.argv[1])), sys.argv[2]
x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
bn = nbn.BatchNorm2d(shape[1], dtype=dtype)
bn.backward(np.ones_like(bn(x)))
print(json.dumps({"import": imported - start, "call": time.perf_counter() - imported}))
"""


def first_call_seconds(shape: tuple[int, ...], dtype: str, env: dict[str, str]) -> dict[str, float]:
    """Seconds to import numbabn and to run the first forward + backward, in a new process."""
    command = [sys.executable, "-c", _SCRIPT, json.dumps(shape), dtype]
    completed = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout)


def _warmup_seconds(dtype: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "numbabn", "warmup", "--dtype", dtype, "--quiet"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def startup_seconds(dtypes: tuple[str, ...] = DTYPES, whole_warmup: bool = True) -> dict[str, Any]:
    """Cold and warm first calls per dtype and size, and the whole warm-up per dtype.

    Returns ``{dtype: {"small": {"cold": ..., "warm": ..., "import": ...}, "large": ...,
    "warmup": seconds or None}}``; ``cold`` and ``warm`` time the first forward +
    backward after the import, ``warm`` the best of three.
    """
    figures: dict[str, Any] = {}
    for dtype in dtypes:
        figures[dtype] = {}
        for size, shape in SIZES.items():
            with tempfile.TemporaryDirectory() as cache_dir:
                env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
                cold = first_call_seconds(shape, dtype, env)
                warms = [first_call_seconds(shape, dtype, env) for _ in range(3)]
                warm = min(warms, key=lambda figures: figures["call"])
            figures[dtype][size] = {
                "cold": cold["call"],
                "warm": warm["call"],
                "import": warm["import"],
            }
        figures[dtype]["warmup"] = None
        if whole_warmup:
            with tempfile.TemporaryDirectory() as cache_dir:
                env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
                figures[dtype]["warmup"] = _warmup_seconds(dtype, env)
    return figures


# Targets: first forward + backward of a small and a large tensor, everything a dtype needs, warm.
TARGETS = {"small": 3.0, "large": 5.0, "warmup": 10.0, "warm": 0.5}


def startup_markdown(figures: dict[str, Any]) -> str:
    """The start-up table: seconds per dtype beside the targets."""
    lines = [
        "### Start-up: first training forward + backward in a fresh process (seconds)",
        "",
        "`cold`: empty Numba cache (everything the call needs compiles); `warm`: cache filled",
        "(best of three); both after `import numbabn`, which took the `import` column.",
        "`whole warm-up`: `python -m numbabn warmup --dtype D` into an empty cache, every",
        "kernel that dtype can need. Targets: small cold "
        f"{TARGETS['small']:.0f} s, large cold {TARGETS['large']:.0f} s, whole warm-up "
        f"{TARGETS['warmup']:.0f} s, warm {TARGETS['warm']} s.",
        "",
        "| dtype | size | shape | cold | warm | import | whole warm-up |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for dtype, per_size in figures.items():
        warmup = per_size.get("warmup")
        for size, shape in SIZES.items():
            row = per_size[size]
            whole = "" if size != "small" or warmup is None else f"{warmup:.1f}"
            dims = "x".join(map(str, shape))
            lines.append(
                f"| {dtype} | {size} | {dims} | {row['cold']:.2f} | {row['warm']:.2f} | "
                f"{row['import']:.2f} | {whole} |"
            )
    return "\n".join(lines) + "\n"
