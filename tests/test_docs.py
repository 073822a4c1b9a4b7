"""The documentation site builds without a warning, its internal links resolve, its code runs.

The site is built once (Sphinx, warnings as errors) into a temporary folder. Every
``href`` and ``src`` of its pages that stays inside the site must name an existing file
and, with a ``#fragment``, an element of that page with that id. Every Python code block
of the guide runs on its own in a fresh namespace, as the README's do (``test_readme.py``);
a block that cannot (it needs a GPU or mpiexec) is marked on the line before its
directive with ``.. skip: reason``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import pytest
from test_readme import run_block

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.rst"))

DIRECTIVE = re.compile(r"^(\s*)\.\. code-block:: python\s*$")
SKIP = re.compile(r"^\s*\.\. skip:\s*(.*?)\s*$")


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None


def code_blocks(path: Path) -> list[Block]:
    """The ``.. code-block:: python`` blocks of a reStructuredText file, dedented."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        directive = DIRECTIVE.match(line)
        if directive is None:
            continue
        marker = SKIP.match(lines[index - 1]) if index else None
        body_start = index + 1
        while body_start < len(lines) and not lines[body_start].strip():
            body_start += 1
        indent = len(lines[body_start]) - len(lines[body_start].lstrip())
        end = body_start
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent
        ):
            end += 1
        code = "\n".join(text[indent:] for text in lines[body_start:end])
        blocks.append(Block(path, body_start + 1, code, marker.group(1) if marker else None))
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sphinx", reason="Sphinx builds the docs (the test extra has it)")
    output = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(output)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"the docs build warned or failed:\n{result.stderr}"
    return output


def test_docs_build_and_hold_every_guide_page(site):
    guide = {path.stem for path in (DOCS / "guide").glob("*.rst")}
    assert guide >= {"install", "quickstart", "training", "interop", "cache", "mpi", "dask"}
    for name in guide:
        assert (site / "guide" / f"{name}.html").is_file(), name
    assert (site / "api.html").is_file() and (site / "examples.html").is_file()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)
            if name == "id" and value:
                self.ids.add(value)


def _parsed(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_internal_links_resolve(site):
    pages = {path: _parsed(path) for path in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("mailto:"):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {link} (no such file)")
            elif parts.fragment and parts.fragment not in pages.get(target, _Links()).ids:
                broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_api_reference_documents_the_public_names(site):
    import numbabn

    text = (site / "api.html").read_text(encoding="utf-8")
    missing = [name for name in numbabn.__all__ if f'id="numbabn.{name}"' not in text]
    assert missing in ([], ["functional"]), missing


def test_guide_has_python_blocks():
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize(
    "block", BLOCKS, ids=[f"{block.path.stem}-L{block.line}" for block in BLOCKS]
)
def test_guide_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip is not None:
        pytest.skip(f"{block.path.relative_to(ROOT)}:{block.line}: {block.skip}")
    monkeypatch.chdir(tmp_path)
    run_block(block.code, block.line, str(block.path), "__guide__")
