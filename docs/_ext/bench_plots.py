"""Sphinx extension: the bench's charts, drawn from its committed tables at build time.

``benchmarks/results/cpu.md`` (written by ``make bench``) holds one table per pass with the
``× roofline`` and ``× PyTorch`` columns. This draws them as two bar charts into
``docs/_generated/`` (not committed), so the charts always show the committed numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "benchmarks" / "results" / "cpu.md"
OUTPUT = ROOT / "docs" / "_generated"
# The passes whose tables have the columns charted, as the bench titles them.
PASSES = ("Train forward", "Backward", "Train forward + backward", "Eval forward")
COLUMNS = {"cpu-roofline.png": "× roofline", "cpu-speedup.png": "× PyTorch"}


def pass_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The rows of each pass's table in ``text``: ``{pass: [{column: cell}]}``."""
    tables: dict[str, list[dict[str, str]]] = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        title = section.split(" (", 1)[0].strip()
        if title not in PASSES:
            continue
        lines = [line for line in section.splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        tables[title] = [
            dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
            for line in lines[2:]
        ]
    missing = set(PASSES) - set(tables)
    if missing:
        raise ValueError(f"{TABLES.name} lacks the tables of {sorted(missing)}")
    return tables


def draw(tables: dict[str, list[dict[str, str]]], column: str, path: Path) -> None:
    """One horizontal bar per case and pass of ``column``, with a line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [row["case"] for row in tables[PASSES[0]]]
    figure, axes = plt.subplots(figsize=(9, 0.42 * len(cases) + 1.6))
    height = 0.8 / len(PASSES)
    for index, title in enumerate(PASSES):
        values = {row["case"]: float(row[column]) for row in tables[title]}
        positions = [i + index * height for i in range(len(cases))]
        axes.barh(positions, [values.get(case, 0.0) for case in cases], height, label=title)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases)
    axes.invert_yaxis()
    axes.set_xlabel(column)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def build_charts(app: Any) -> None:
    OUTPUT.mkdir(exist_ok=True)
    tables = pass_tables(TABLES.read_text(encoding="utf-8"))
    for name, column in COLUMNS.items():
        draw(tables, column, OUTPUT / name)


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", build_charts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
