"""Wide feature matrices: ``BatchNorm1d`` on ``(N, C)`` beside ``torch.nn.BatchNorm1d``.

``python -m tools.bench.wide`` (``make bench-wide``) sweeps C over 16 to 8192 with N
chosen so that N * C is 64 Ki and 4 Mi float32 elements, and times numbabn's module
and PyTorch's with the small-calls table's code (:mod:`tools.bench.small_calls`: the
same calls, the same threads, every timing of a shape sampled in the same rounds).
Beside them stands a NumPy floor timed in the same rounds: ``np.multiply(x, scale,
out=y)`` into a preallocated array, one read and one write of the data, the least
any eval forward does.
"""

from __future__ import annotations

from typing import Any

from tools.bench.small_calls import PASSES, SmallCase, _ratio, _us, measure_small, run_table

CHANNELS = (16, 64, 256, 1024, 4096, 8192)
ELEMENTS = (1 << 16, 1 << 22)
WIDE_CASES = [
    SmallCase("BatchNorm1d", (elements // channels, channels))
    for elements in ELEMENTS
    for channels in CHANNELS
]


def wide_markdown(wide: dict[str, Any]) -> str:
    """The wide table: microseconds per call, PyTorch's time over numbabn's, the NumPy floor."""
    runs = wide.get("runs", 1)
    over = f"; the median of {runs} runs of them" if runs > 1 else ""
    lines = [
        "### Wide feature matrices: BatchNorm1d on (N, C) beside torch.nn's, float32",
        "",
        "Medians in microseconds per call, sampled in the same rounds",
        f"({wide['repeat']} rounds{over}), {wide['threads']} threads each; the calls are the",
        "small-calls table's. `× PyTorch` is PyTorch's time over numbabn's (above 1: numbabn",
        "is faster). `multiply`: NumPy's `multiply(x, scale, out=y)` into a preallocated",
        "array, one read and one write of the data; `eval / multiply` is numbabn's eval",
        "over it.",
        "",
        "| N | C | train fwd | PyTorch | × PyTorch | fwd + bwd | PyTorch | × PyTorch "
        "| eval | PyTorch | × PyTorch | multiply | eval / multiply |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in wide["results"]:
        seconds = result["seconds"]
        n, c = result["shape"]
        cells = []
        for key in PASSES:
            mine, theirs = seconds[f"numbabn_{key}"], seconds.get(f"torch_{key}")
            cells += [_us(mine), _us(theirs) or "n/a", _ratio(theirs, mine)]
        multiply = seconds["multiply"]
        cells += [_us(multiply), f"{seconds['numbabn_eval'] / multiply:.2f}"]
        lines.append(f"| {n} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    run_table(
        argv, "python -m tools.bench.wide",
        "BatchNorm1d on wide (N, C) matrices: numbabn beside torch.nn on CPU tensors.",
        "numbabn wide feature matrices",
        lambda repeat, threads, with_torch, runs: wide_markdown(
            measure_small(repeat, threads, with_torch, WIDE_CASES, runs=runs, multiply=True)
        ),
        repeat=11, runs=1,
    )  # fmt: skip


if __name__ == "__main__":
    main()
