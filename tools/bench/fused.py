"""``relu(bn(x) + z)``: numbabn's fused pass beside the unfused sequence and PyTorch."""

from __future__ import annotations

from typing import Any

import numpy as np

from tools.bench.cases import Case, module_for
from tools.bench.timing import interleaved_medians

FUSED_CASES = [
    Case((32, 64, 56, 56)),
    Case((64, 256, 14, 14)),
    Case((32, 64, 56, 56), channels_last=True),
    Case((2, 16, 8, 8)),
]
QUICK_FUSED_CASES = [Case((32, 64, 56, 56)), Case((2, 16, 8, 8))]


class _Unfused:
    """numbabn's batch norm, then the add and the ReLU in NumPy, as a NumPy user chains them."""

    def __init__(self, x: np.ndarray) -> None:
        self.bn = module_for(x.ndim)(x.shape[1], dtype=x.dtype)

    def forward(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        y = self.bn(x)
        y += z
        np.maximum(y, 0, out=y)
        self.y = y
        return y

    def backward(self, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = dy * (self.y > 0)
        return self.bn.backward(g), g


class _TorchComposition:
    """``relu(batch_norm(x) + z)`` in PyTorch with the same threads."""

    def __init__(self, x: np.ndarray, z: np.ndarray, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        channels = x.shape[1]
        self.x = torch.from_numpy(x).requires_grad_(True)
        self.z = torch.from_numpy(z).requires_grad_(True)
        self.weight = torch.ones(channels, dtype=self.x.dtype, requires_grad=True)
        self.bias = torch.zeros(channels, dtype=self.x.dtype, requires_grad=True)
        self.running = (
            torch.zeros(channels, dtype=self.x.dtype),
            torch.ones(channels, dtype=self.x.dtype),
        )
        self.dy = torch.ones_like(self.x)

    def _compose(self) -> Any:
        functional = self.torch.nn.functional
        y = functional.batch_norm(self.x, *self.running, self.weight, self.bias, True)
        return functional.relu(y + self.z)

    def forward(self) -> None:
        with self.torch.no_grad():
            self._compose()

    def forward_backward(self) -> None:
        y = self._compose()
        self.torch.autograd.grad(y, (self.x, self.z, self.weight, self.bias), self.dy)


def measure_fused(case: Case, repeat: int, threads: int, with_torch: bool) -> dict[str, Any]:
    """Median seconds of the forward and backward of ``relu(bn(x) + z)``, three ways."""
    x = case.make()
    z = case.make(seed=1)
    dy = np.ones_like(x)
    fused = module_for(x.ndim)(x.shape[1], dtype=x.dtype, activation="relu")
    unfused = _Unfused(x)
    fused(x, residual=z)  # each backward needs a forward first
    unfused.forward(x, z)
    funcs = {
        "fused_forward": lambda: fused(x, residual=z),
        "fused_backward": lambda: fused.backward(dy),
        "unfused_forward": lambda: unfused.forward(x, z),
        "unfused_backward": lambda: unfused.backward(dy),
    }
    if with_torch:
        peer = _TorchComposition(x, z, threads)
        funcs.update(torch_forward=peer.forward, torch_forward_backward=peer.forward_backward)
    times = interleaved_medians(funcs, repeat)
    if with_torch:
        # PyTorch's backward needs its forward's graph: time both, then take the forward off.
        times["torch_backward"] = times.pop("torch_forward_backward") - times["torch_forward"]
    return {"case": case.name, "bytes": case.nbytes, "seconds": times}


def fused_markdown(results: list[dict[str, Any]]) -> str:
    """The fused table: times in milliseconds and how many times faster the fused pass is."""
    lines = [
        "### relu(bn(x) + z): fused, unfused (numbabn, then add and ReLU in NumPy) and PyTorch",
        "",
        "PyTorch's backward is its forward+backward minus its forward (autograd needs the graph).",
        "",
        "| case | pass | fused | unfused | × unfused | PyTorch | × PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        seconds = result["seconds"]
        for key in ("forward", "backward"):
            mine = seconds[f"fused_{key}"]
            unfused = seconds[f"unfused_{key}"]
            theirs = seconds.get(f"torch_{key}")
            torch_cells = "n/a | n/a"
            if theirs is not None:
                torch_cells = f"{theirs * 1e3:.3f} | {theirs / mine:.2f}"
            lines.append(
                f"| {result['case']} | {key} | {mine * 1e3:.3f} | {unfused * 1e3:.3f} | "
                f"{unfused / mine:.2f} | {torch_cells} |"
            )
    return "\n".join(lines) + "\n"
