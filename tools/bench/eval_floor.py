"""The eval forward's arithmetic floor, beside numbabn's eval and PyTorch's.

``python -m tools.bench.eval_floor`` (``make bench-eval-floor``) asks how fast any
eval forward with numbabn's results can be. numbabn computes each output as
``float32(x * scale + shift)`` with ``scale`` and ``shift`` in float64, the
arithmetic of its training forward's normalisation, whose bits every release has
kept; PyTorch computes ``x * alpha + beta`` in float32. On a tensor that the
caches hold between calls the pass is bound by arithmetic rather than memory, and
an AVX2 vector holds 4 float64 lanes where it holds 8 float32 ones.

For each case, in the same rounds and with the same threads: numbabn's module in
eval mode (a new output, as PyTorch's makes) and with ``out=``; PyTorch's module in
eval mode under ``no_grad``; and two minimal ``@njit(parallel=True)`` kernels into a
preallocated output, one with numbabn's float64 arithmetic (the floor of any
implementation that keeps numbabn's bits) and one with PyTorch's float32 arithmetic.
Where the float64 floor is slower than PyTorch's whole call, no implementation that
keeps numbabn's results can match PyTorch there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

import numbabn
from tools.bench.small_calls import SmallCase, _ratio, _us, run_table
from tools.bench.timing import interleaved_medians

# The main table's mid-size rows (6-26 MB: cache-resident on a large last-level cache)
# and the small-calls table's eval rows that come out below PyTorch on some machines.
FLOOR_CASES = [
    SmallCase("BatchNorm2d", (32, 64, 56, 56)),
    SmallCase("BatchNorm2d", (32, 128, 28, 28)),
    SmallCase("BatchNorm2d", (32, 256, 14, 14)),
    SmallCase("BatchNorm2d", (32, 2048, 7, 7)),
    SmallCase("BatchNorm2d", (8, 3, 224, 224)),
    SmallCase("BatchNorm2d", (8, 32, 32, 32)),
    SmallCase("BatchNorm1d", (32, 64, 100)),
    SmallCase("BatchNorm1d", (1024, 512)),
]
CALLS = ("numbabn", "numbabn_out", "torch", "floor64", "floor32")


@njit(parallel=True, cache=True)
def affine_rows(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: np.ndarray) -> None:
    """``out = x * scale[c] + shift[c]`` over ``(N, C, L)`` rows, in the type of ``scale``."""
    n, channels, length = x.shape
    for i in prange(n):
        if length == 1:  # an (N, C) matrix: a row of channels
            for c in range(channels):
                out[i, c, 0] = x[i, c, 0] * scale[c] + shift[c]
        else:
            for c in range(channels):
                a, b = scale[c], shift[c]
                for j in range(length):
                    out[i, c, j] = x[i, c, j] * a + b


def _rows(array: np.ndarray) -> np.ndarray:
    """``array`` as ``(N, C, L)``: an ``(N, C)`` matrix as rows of one value."""
    return array.reshape(array.shape[0], array.shape[1], -1)


def floor_calls(case: SmallCase, x: np.ndarray, with_torch: bool) -> dict[str, Any]:
    """The timed calls of ``case`` on ``x``: numbabn, PyTorch and the two floors."""
    channels = case.shape[1]
    rng = np.random.default_rng(1)
    module = getattr(numbabn, case.module)(channels, dtype=np.float32)
    module.running_mean[:] = rng.standard_normal(channels)
    module.running_var[:] = rng.uniform(0.5, 2.0, channels)
    module.eval()
    out = np.empty_like(x)
    invstd = 1.0 / np.sqrt(module.running_var.astype(np.float64) + module.eps)
    scale64 = module.weight.astype(np.float64) * invstd
    shift64 = module.bias - module.running_mean.astype(np.float64) * scale64
    scale32, shift32 = scale64.astype(np.float32), shift64.astype(np.float32)
    rows, out_rows = _rows(x), _rows(out)

    def floor(scale: np.ndarray, shift: np.ndarray) -> Any:
        def call() -> np.ndarray:
            affine_rows(rows, scale, shift, out_rows)
            return out

        return call

    calls: dict[str, Any] = {
        "numbabn": lambda: module(x),
        "numbabn_out": lambda: module(x, out=out),
        "floor64": floor(scale64, shift64),
        "floor32": floor(scale32, shift32),
    }
    if with_torch:
        import torch

        theirs = getattr(torch.nn, case.module)(channels)
        with torch.no_grad():
            theirs.running_mean.copy_(torch.from_numpy(module.running_mean))
            theirs.running_var.copy_(torch.from_numpy(module.running_var))
        theirs.eval()
        tensor = torch.from_numpy(x)

        def torch_eval() -> None:
            with torch.no_grad():
                theirs(tensor)

        calls["torch"] = torch_eval
    return calls


def measure_floor(
    repeat: int, threads: int, with_torch: bool, runs: int = 1, cases: list[SmallCase] | None = None
) -> dict[str, Any]:
    """Medians (seconds) of every call of every case (``FLOOR_CASES`` unless given); each the
    median of ``runs`` runs."""
    if with_torch:
        import torch

        torch.set_num_threads(threads)
    rows = []
    for case in FLOOR_CASES if cases is None else cases:
        x = case.make()
        calls = floor_calls(case, x, with_torch)
        for call in calls.values():
            call()  # compiled (or loaded) before timing
        medians = [interleaved_medians(calls, repeat) for _ in range(runs)]
        rows.append({
            "case": case.name,
            "mb": x.nbytes / 1e6,
            **{name: float(np.median([m[name] for m in medians])) for name in calls},
        })  # fmt: skip
    return {"repeat": repeat, "threads": threads, "runs": runs, "rows": rows}


def floor_markdown(floor: dict[str, Any]) -> str:
    """The table: microseconds per call and the ratios that decide what can be met."""
    runs = floor.get("runs", 1)
    over = f"; the median of {runs} runs of them" if runs > 1 else ""
    lines = [
        "### Eval forward beside its arithmetic floor, float32 data",
        "",
        f"Medians in microseconds per call, sampled in the same rounds ({floor['repeat']}",
        f"rounds{over}), {floor['threads']} threads each. `numbabn`: `bn(x)` in eval mode (a",
        "new output); `out=`: into a preallocated one; `PyTorch`: `bn(x)` under `no_grad`;",
        "`floor f64`: one compiled loop with numbabn's float64 arithmetic into a preallocated",
        "output, the least any call with numbabn's results costs; `floor f32`: the same",
        "loop in PyTorch's float32 arithmetic. `× PyTorch` is PyTorch's time over numbabn's;",
        "`PyTorch / floor f64` below 1 means that no implementation with numbabn's results",
        "can match PyTorch on that case.",
        "",
        "| case | MB | numbabn | out= | PyTorch | × PyTorch | floor f64 | floor f32 "
        "| f64 / f32 | PyTorch / floor f64 | out= / floor f64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in floor["rows"]:
        torch_time = row.get("torch")
        lines.append(
            f"| {row['case']} | {row['mb']:.1f} | {_us(row['numbabn'])} | "
            f"{_us(row['numbabn_out'])} | {_us(torch_time)} | "
            f"{_ratio(torch_time, row['numbabn'])} | {_us(row['floor64'])} | "
            f"{_us(row['floor32'])} | {row['floor64'] / row['floor32']:.2f} | "
            f"{_ratio(torch_time, row['floor64'])} | "
            f"{row['numbabn_out'] / row['floor64']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    run_table(
        argv, "python -m tools.bench.eval_floor",
        "Eval forward beside its float64 and float32 arithmetic floors and PyTorch.",
        "numbabn eval floor",
        lambda repeat, threads, with_torch, runs: floor_markdown(
            measure_floor(repeat, threads, with_torch, runs=runs)
        ),
        repeat=21, runs=3,
    )  # fmt: skip


if __name__ == "__main__":
    main()
