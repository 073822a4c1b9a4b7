"""Turn measurements into Markdown tables, JSON and a PNG chart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Pass:
    """A timed operation, the streaming passes it cannot avoid, and its peers' keys."""

    title: str
    key: str
    reads: int
    read_writes: int

    @property
    def bytes_per_element_pass(self) -> int:
        # A read pass moves the data once, a read+write pass twice.
        return self.reads + 2 * self.read_writes

    def roofline(self, seconds: dict[str, float]) -> float:
        return self.reads * seconds["read"] + self.read_writes * seconds["read_write"]


PASSES = [
    Pass("Train forward", "forward", reads=1, read_writes=1),
    Pass("Backward", "backward", reads=3, read_writes=1),
    Pass("Train forward + backward", "forward_backward", reads=4, read_writes=2),
    Pass("Eval forward", "eval", reads=0, read_writes=1),
]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.3f}" if seconds < 1e-3 else f"{seconds * 1e3:.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def pass_rows(result: dict[str, Any], spec: Pass) -> dict[str, float | None]:
    """The figures of one table row: times in seconds and the ratios."""
    seconds = result["seconds"]
    mine = seconds[f"numbabn_{spec.key}"]
    mine_out = seconds.get(f"numbabn_{spec.key}_out", mine)
    roofline = spec.roofline(seconds)
    torch_time = seconds.get(f"torch_{spec.key}")
    numpy_time = seconds.get(f"numpy_{spec.key}")
    return {
        "numbabn": mine,
        "numbabn_out": mine_out,
        "gb_per_s": spec.bytes_per_element_pass * result["bytes"] / mine_out / 1e9,
        "roofline": roofline,
        "vs_roofline": mine_out / roofline,
        "torch": torch_time,
        "speedup_torch": None if torch_time is None else torch_time / mine,
        "numpy": numpy_time,
        "speedup_numpy": None if numpy_time is None else numpy_time / mine,
    }


def markdown(results: list[dict[str, Any]], header: str) -> str:
    """All tables as one Markdown document."""
    lines = [header, ""]
    lines += [
        "Times are medians in milliseconds. `numbabn` is a plain call (it allocates its output,",
        "as PyTorch and NumPy do); `out=` writes into a preallocated array and is what is",
        "compared with the roofline: the streaming read and read+write passes the operation",
        "cannot avoid, measured in the same run with the same threads. `× roofline` is",
        "numbabn `out=` time over roofline time (1.00 is the memory limit); `× PyTorch` and",
        "`× NumPy` are how many times faster numbabn is than each peer. A plain call also",
        "pays for page faults on its fresh output whenever the C library has handed that",
        "memory back to the system between calls, which two large outputs alive at once",
        "(forward + backward) make likelier: compare its two columns. Each median comes",
        "from rounds in which every timing of the case takes one sample in turn, so a slow",
        "spell on a shared machine falls on numbabn, its peers and the roofline alike.",
        "Tensors smaller than the last-level cache (its size is on the machine line; a",
        "virtual machine shares it with other guests) stay partly in it between calls, where",
        "timings of the same command vary most from run to run.",
        "",
    ]
    for spec in PASSES:
        lines += [
            f"### {spec.title} ({spec.reads} read + {spec.read_writes} read/write passes)",
            "",
            "| case | MB | numbabn | out= | GB/s | roofline | × roofline | PyTorch | × PyTorch"
            " | NumPy | × NumPy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        worst: dict[str, float] = {}
        for result in results:
            row = pass_rows(result, spec)
            lines.append(
                f"| {result['case']} | {result['bytes'] / 1e6:.1f} | {_ms(row['numbabn'])} | "
                f"{_ms(row['numbabn_out'])} | {row['gb_per_s']:.1f} | {_ms(row['roofline'])} | "
                f"{_ratio(row['vs_roofline'])} | {_ms(row['torch'])} | "
                f"{_ratio(row['speedup_torch'])} | {_ms(row['numpy'])} | "
                f"{_ratio(row['speedup_numpy'])} |"
            )
            if result["bytes"] >= 1e6:
                vs_roofline = row["vs_roofline"]
                assert vs_roofline is not None  # pass_rows always computes it
                worst["vs_roofline"] = max(worst.get("vs_roofline", 0.0), vs_roofline)
                for key in ("speedup_torch", "speedup_numpy"):
                    speedup = row[key]
                    if speedup is not None:
                        worst[key] = min(worst.get(key, float("inf")), speedup)
        summary = ", ".join(f"{key} {value:.2f}" for key, value in worst.items())
        lines += ["", f"Worst over cases of 1 MB or more: {summary}.", ""]
    lines += [
        "### Peak memory above the inputs (MB, traced NumPy allocations)",
        "",
        "| case | MB | forward | forward out= | backward | NumPy forward |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        keys = ("numbabn_forward_peak", "numbabn_forward_out_peak", "numbabn_backward_peak",
                "numpy_forward_peak")  # fmt: skip
        # No NumPy peer for 16-bit floats: n/a there.
        cells = " | ".join(
            "n/a" if result.get(key) is None else f"{result[key] / 1e6:.2f}" for key in keys
        )
        lines.append(f"| {result['case']} | {result['bytes'] / 1e6:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def write_png(path: Path, results: list[dict[str, Any]]) -> bool:
    """Bar chart of the roofline ratio and the speed-up over PyTorch; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [result["case"] for result in results]
    figure, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(names) + 2), sharey=True)
    height = 0.8 / len(PASSES)
    for index, spec in enumerate(PASSES):
        rows = [pass_rows(result, spec) for result in results]
        positions = [i + index * height for i in range(len(names))]
        axes[0].barh(positions, [row["vs_roofline"] for row in rows], height, label=spec.title)
        speedups = [row["speedup_torch"] or 0.0 for row in rows]
        axes[1].barh(positions, speedups, height, label=spec.title)
    axes[0].axvline(1.0, color="black", linewidth=0.8)
    axes[0].set_title("time / roofline (lower is better, 1 = memory limit)")
    axes[1].axvline(1.0, color="black", linewidth=0.8)
    axes[1].set_title("speed-up over PyTorch CPU (higher is better)")
    axes[0].set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
