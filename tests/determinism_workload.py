"""A fixed workload whose every result must be bit-identical whatever the thread count.

Imported by ``test_determinism.py`` and also run as a script in a subprocess
with another ``NUMBA_NUM_THREADS``::

    python determinism_workload.py RESULTS.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_input  # noqa: E402

import numbabn  # noqa: E402

# Small ones first (their one-call kernels are loaded before the parallel ones), then
# shapes large enough for the parallel kernels and several tiles per channel.
CASES = [
    ("small", (2, 16, 8, 8), "contiguous", np.float64),
    ("small32", (2, 16, 8, 8), "contiguous", np.float32),
    ("nchw", (4, 3, 130, 130), "contiguous", np.float32),
    ("nhwc", (4, 3, 130, 130), "channels_last", np.float32),
    ("ncl", (3, 5, 70000), "contiguous", np.float64),
    ("nc", (70000, 3), "contiguous", np.float32),
    ("nc_wide", (300, 1030), "contiguous", np.float32),
    ("short_rows", (64, 64, 7, 7), "contiguous", np.float32),
    ("sliced", (4, 3, 130, 130), "inner_slice", np.float64),
    ("short_rows64", (64, 64, 7, 7), "contiguous", np.float64),
]
try:  # 16-bit floats into float32 modules; bfloat16 needs ml_dtypes
    import ml_dtypes
except ImportError:
    pass
else:
    CASES += [
        ("nchw_bf16", (4, 3, 130, 130), "contiguous", np.dtype(ml_dtypes.bfloat16)),
        ("nhwc_f16", (4, 3, 130, 130), "channels_last", np.dtype(np.float16)),
    ]
# relu(bn(x) + z): the fused kernels, one-call then parallel.
FUSED_SHAPES = [(2, 16, 8, 8), (4, 3, 130, 130)]
CLASSES = {2: numbabn.BatchNorm1d, 3: numbabn.BatchNorm1d, 4: numbabn.BatchNorm2d}


def compute() -> dict[str, np.ndarray]:
    """Train forward/backward twice, then eval forward/backward, for every case."""
    results = {}
    for seed, (name, shape, layout, dtype) in enumerate(CASES):
        rng = np.random.default_rng(seed)
        module_dtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
        module = CLASSES[len(shape)](shape[1], momentum=None, dtype=module_dtype)
        module.weight[...] = rng.uniform(0.5, 1.5, shape[1])
        for step in range(2):
            x = make_input(rng, shape, layout, dtype, loc=10.0 * step)
            dy = make_input(rng, shape, layout, dtype)
            results[f"{name}/train{step}/y"] = module(x)
            results[f"{name}/train{step}/dx"] = module.backward(dy)
        module.eval()
        results[f"{name}/eval/y"] = module(x)
        results[f"{name}/eval/dx"] = module.backward(dy)
        for key, value in module.state_dict().items():
            results[f"{name}/state/{key}"] = value
        for key, value in module.grads.items():
            results[f"{name}/grad/{key}"] = value.copy()
    results.update(compute_fused())
    # As bits: np.savez keeps no ml_dtypes dtype.
    return {key: value.view(np.uint16) if value.dtype.itemsize == 2 else value
            for key, value in results.items()}  # fmt: skip


def compute_fused() -> dict[str, np.ndarray]:
    """A fused ReLU with a residual, trained then evaluated, in float64."""
    results = {}
    for seed, shape in enumerate(FUSED_SHAPES, start=len(CASES)):
        rng = np.random.default_rng(seed)
        module = numbabn.BatchNorm2d(shape[1], activation="relu", dtype=np.float64)
        for mode in ("train", "eval"):
            module.train(mode == "train")
            x, z, dy = (make_input(rng, shape, dtype=np.float64) for _ in range(3))
            key = f"fused{shape}/{mode}"
            results[f"{key}/y"] = module(x, residual=z)
            results[f"{key}/dx"], results[f"{key}/dz"] = module.backward(dy)
    return results


def main(path: str) -> None:
    import numba

    results = compute()
    results["num_threads"] = np.array(numba.get_num_threads())
    np.savez(path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
