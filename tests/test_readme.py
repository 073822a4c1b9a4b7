"""Every ```python block of README.md runs, so the documentation cannot drift from the code.

Each block runs on its own, in a fresh namespace, in a temporary working directory:
the README's sections are read one at a time, so every example states its own
imports and data. A block that cannot run stand-alone (it needs mpiexec, a GPU,
or names only the reader has) is marked in the README on the line before it::

    <!-- skip: needs a CUDA GPU -->

and is reported as a skip with that reason. Test ids name the block's line and
section, e.g. ``L24-quickstart``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.*?)\s*-->\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")


class Block(NamedTuple):
    line: int  # 1-based line of the first code line
    section: str
    code: str
    skip: str | None  # the marker's reason, if any


def readme_blocks(text: str) -> list[Block]:
    """The README's ```python blocks, with their section and skip marker."""
    blocks = []
    section = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        if fence is None:
            heading = HEADING.match(line)
            if heading:
                section = heading.group(1)
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        if fence.group(1) == "python":
            before = [text_line for text_line in lines[:index] if text_line.strip()]
            marker = SKIP.match(before[-1]) if before else None
            code = "\n".join(lines[index + 1 : end])
            blocks.append(Block(index + 2, section, code, marker.group(1) if marker else None))
        index = end + 1
    return blocks


def _slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")[:40]


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 1


def test_skip_markers_sit_before_python_blocks():
    """A marker not directly followed by a ```python block would silently skip nothing."""
    lines = README.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if SKIP.match(line):
            following = [text for text in lines[number + 1 :] if text.strip()]
            assert following and following[0].strip() == "```python", (
                f"README.md:{number + 1}: skip marker without a ```python block after it"
            )


@pytest.mark.parametrize(
    "block", BLOCKS, ids=[f"L{block.line}-{_slug(block.section)}" for block in BLOCKS]
)
def test_readme_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line - 1}: {block.skip}")
    monkeypatch.chdir(tmp_path)
    run_block(block.code, block.line, "<README.md>", "__readme__")


def run_block(code: str, line: int, filename: str, name: str) -> None:
    """Run ``code`` in a fresh namespace named ``name``, as if at ``line`` of ``filename``."""
    # Padding puts the code at its line numbers in tracebacks.
    exec(compile("\n" * (line - 1) + code, filename, "exec"), {"__name__": name})
