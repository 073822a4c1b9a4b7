"""Several Python threads calling forward/backward at once: no crash, right answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import make_input

import numbabn
from numbabn import functional as F
from numbabn._cpu.backend import PARALLEL_MIN_ELEMENTS

# (shape, layout): big ones take the parallel kernels, small ones the serial kernels.
JOBS = [
    ((4, 3, 130, 130), "contiguous"),
    ((4, 3, 130, 130), "channels_last"),
    ((70000, 3), "contiguous"),
    ((32, 64, 7, 7), "inner_slice"),
    ((4, 3, 5, 5), "contiguous"),
    ((16, 8), "contiguous"),
]


def work(job: int) -> dict[str, np.ndarray]:
    """A self-contained train/eval forward/backward sequence for job ``job``."""
    shape, layout = JOBS[job % len(JOBS)]
    rng = np.random.default_rng(job)
    cls = numbabn.BatchNorm2d if len(shape) == 4 else numbabn.BatchNorm1d
    module = cls(shape[1], momentum=0.3)
    results = {}
    for step in range(2):
        x = make_input(rng, shape, layout, np.float32, loc=step)
        dy = make_input(rng, shape, dtype=np.float32)
        results[f"y{step}"] = module(x)
        results[f"dx{step}"] = module.backward(dy)
    module.eval()
    results["eval_y"] = module(x)
    results["eval_dx"] = module.backward(dy)
    results["running_mean"] = module.running_mean.copy()
    results["running_var"] = module.running_var.copy()
    results["grad_weight"] = module.grads["weight"].copy()
    return results


def test_jobs_cover_both_paths():
    sizes = [int(np.prod(shape)) for shape, _ in JOBS]
    assert max(sizes) >= PARALLEL_MIN_ELEMENTS > min(sizes)


def test_concurrent_modules():
    jobs = list(range(3 * len(JOBS)))
    expected = [work(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(work, jobs))
    for job, (g, e) in enumerate(zip(got, expected, strict=True)):
        for key in e:
            # Deterministic kernels: concurrency changes nothing, to the bit.
            assert g[key].tobytes() == e[key].tobytes(), (job, key)


def test_concurrent_functional_shared_input(rng):
    """Threads sharing one input and computing independent results."""
    x = make_input(rng, (4, 3, 130, 130), "channels_last", np.float32)
    weights = [rng.uniform(0.5, 1.5, 3).astype(np.float32) for _ in range(8)]

    def job(weight):
        y, saved = F.batch_norm_forward(x, None, None, weight, None, training=True)
        dx, dw, db = F.batch_norm_backward(y, x, saved, weight)
        return y, dx, dw, db

    expected = [job(w) for w in weights]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(job, weights))
    for g, e in zip(got, expected, strict=True):
        for a, b in zip(g, e, strict=True):
            assert a.tobytes() == b.tobytes()
