"""Forward + backward with the operands in mixed memory layouts, beside the same-layout time.

A NumPy pipeline hands over whatever layout its previous step produced: the
gradient can come back channels-last for a NCHW input, a residual can arrive in
another layout than the input. Each row times a training forward and backward
with ``out=`` buffers and divides by the same-layout row it should be compared
with; PyTorch runs the same forward and backward on the same arrays beside it
(it has no ``out=``), so that its own ratios show what the mix costs a peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tools.bench.cases import Case, module_for
from tools.bench.timing import interleaved_medians

SHAPE = (32, 64, 56, 56)
QUICK_SHAPE = (8, 64, 28, 28)


@dataclass(frozen=True)
class LayoutCase:
    """Which operands are channels-last, and the row (and target ratio) it is compared with."""

    name: str
    x_cl: bool = False
    dy_cl: bool = False
    residual_cl: bool | None = None  # None: no residual (plain batch norm)
    baseline: str = ""
    target: float | None = None


LAYOUT_CASES = [
    LayoutCase("x, dy NCHW"),
    LayoutCase("x, dy channels-last", True, True, baseline="x, dy NCHW", target=1.2),
    LayoutCase("x channels-last, dy NCHW", True, False, baseline="x, dy channels-last", target=1.3),
    LayoutCase("x NCHW, dy channels-last", False, True, baseline="x, dy NCHW", target=1.3),
    LayoutCase("relu(bn(x) + z): x, z, dy NCHW", residual_cl=False),
    LayoutCase(
        "relu(bn(x) + z): z channels-last",
        residual_cl=True,
        baseline="relu(bn(x) + z): x, z, dy NCHW",
        target=1.3,
    ),
]


def _make(shape: tuple[int, ...], channels_last: bool, seed: int) -> np.ndarray:
    return Case(shape, channels_last=channels_last).make(seed)


def make_step(case: LayoutCase, shape: tuple[int, ...]) -> Any:
    """A function running one training forward + backward of ``case``, with ``out=``."""
    x = _make(shape, case.x_cl, 0)
    dy = _make(shape, case.dy_cl, 1)
    residual = None if case.residual_cl is None else _make(shape, case.residual_cl, 2)
    activation = None if residual is None else "relu"
    module = module_for(len(shape))(shape[1], dtype=x.dtype, activation=activation)
    out, grad = np.empty_like(x), np.empty_like(x)

    def step() -> None:
        module(x, out, residual=residual)
        module.backward(dy, grad)

    return step


def make_torch_step(case: LayoutCase, shape: tuple[int, ...], threads: int) -> Any:
    """PyTorch's training forward + backward of ``case``, on arrays laid out as numbabn's."""
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(_make(shape, case.x_cl, 0)).requires_grad_(True)
    dy = torch.from_numpy(_make(shape, case.dy_cl, 1))
    channels = shape[1]
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running = torch.zeros(channels), torch.ones(channels)
    residual = None
    if case.residual_cl is not None:
        residual = torch.from_numpy(_make(shape, case.residual_cl, 2)).requires_grad_(True)
    inputs = (x, weight, bias) if residual is None else (x, residual, weight, bias)

    def step() -> None:
        y = torch.nn.functional.batch_norm(x, *running, weight, bias, True)
        if residual is not None:
            y = torch.relu(y + residual)
        torch.autograd.grad(y, inputs, dy)

    return step


def measure_layouts(
    repeat: int, quick: bool = False, threads: int = 1, with_torch: bool = False
) -> dict[str, Any]:
    """Median seconds per layout case (and PyTorch's), sampled in the same rounds; ratios."""
    shape = QUICK_SHAPE if quick else SHAPE
    steps = {case.name: make_step(case, shape) for case in LAYOUT_CASES}
    if with_torch:
        for case in LAYOUT_CASES:
            steps[_TORCH + case.name] = make_torch_step(case, shape, threads)
    return {"shape": list(shape), "rows": rows_from_seconds(interleaved_medians(steps, repeat))}


_TORCH = "torch: "


def rows_from_seconds(seconds: dict[str, float]) -> list[dict[str, Any]]:
    """One table row per layout case: its time and its ratio to its baseline's, PyTorch's too."""
    rows = []
    for case in LAYOUT_CASES:
        ratio = seconds[case.name] / seconds[case.baseline] if case.baseline else None
        torch_seconds = seconds.get(_TORCH + case.name)
        torch_ratio = None
        if torch_seconds is not None and case.baseline:
            torch_ratio = torch_seconds / seconds[_TORCH + case.baseline]
        rows.append(
            {
                "case": case.name,
                "seconds": seconds[case.name],
                "baseline": case.baseline or None,
                "ratio": ratio,
                "target": case.target,
                "met": None if ratio is None or case.target is None else ratio <= case.target,
                "torch_seconds": torch_seconds,
                "torch_ratio": torch_ratio,
            }
        )
    return rows


def layouts_markdown(layouts: dict[str, Any]) -> str:
    """The mixed-layout table, with each ratio beside its target."""
    dims = "x".join(map(str, layouts["shape"]))
    lines = [
        f"### Mixed layouts: train forward + backward with `out=`, {dims} float32",
        "",
        "`ratio`: the time over the row named in `compared with`; `target`: the most it may be.",
        "PyTorch's columns: its own forward + backward of the same arrays (without `out=`),",
        "and its own ratio to the same row.",
        "",
        "| operands | ms | compared with | ratio | target | met | PyTorch ms | PyTorch ratio |",
        "|---|---:|---|---:|---:|---|---:|---:|",
    ]

    def cell(value: float | None, scale: float = 1.0) -> str:
        return "" if value is None else f"{value * scale:.2f}"

    for row in layouts["rows"]:
        target = "" if row["target"] is None else f"{row['target']:.1f}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(
            f"| {row['case']} | {row['seconds'] * 1e3:.2f} | {row['baseline'] or ''} | "
            f"{cell(row['ratio'])} | {target} | {met} | "
            f"{cell(row.get('torch_seconds'), 1e3)} | {cell(row.get('torch_ratio'))} |"
        )
    return "\n".join(lines) + "\n"
