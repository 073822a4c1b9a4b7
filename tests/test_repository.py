"""The repository stands alone, and its version is defined once.

Nothing tracked refers to a file outside the repository; every relative link in
the Markdown files reaches an existing file (and heading); ``numbabn.__version__``
is the installed version and the latest one in CHANGELOG.md. The package holds the
library only: the tools of the checkout (``tools/``) are neither installed nor
imported by it.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest

import numbabn

ROOT = Path(__file__).resolve().parent.parent

# Text that points out of the repository: a parent directory, absolute home or work
# directories, and a sibling folder of shared files (each spelt so that this file
# does not match itself).
OUTSIDE = [
    re.compile(r"\.\./"),
    re.compile(r"(?<![\w.~-])/(?:work|home|farm|Users|mnt|root)/"),
    re.compile(r"(?<![\w./-])shared[/]"),
]
# Path-like names of Markdown files, and of repository files under a top-level folder.
MARKDOWN_NAME = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:numbabn|tools|tests|docs|benchmarks|examples)/[\w./-]*\w\.(?:py|md))\b"
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*```")


def _repository_files() -> list[Path]:
    """Tracked files, and new ones not ignored, that exist and read as text."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


@pytest.fixture(scope="module")
def files() -> list[Path]:
    return _repository_files()


def _where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def test_nothing_refers_outside_the_repository(files):
    found = [
        f"{_where(path, text, match.start())}: {match.group(0)!r}"
        for path in files
        for text in [path.read_text(encoding="utf-8")]
        for pattern in OUTSIDE
        for match in pattern.finditer(text)
    ]
    assert not found, "references outside the repository:\n" + "\n".join(found)


def _exists(path: Path, name: str, names: set[str]) -> bool:
    """Whether ``name`` is a file beside ``path``, under the root, or (bare) anywhere."""
    if (path.parent / name).exists() or (ROOT / name).exists():
        return True
    return "/" not in name and name in names


def test_named_files_exist(files):
    """A Markdown file or a repository path named anywhere is in the repository."""
    names = {path.name for path in files}
    missing = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern in (MARKDOWN_NAME, REPO_PATH):
            for match in pattern.finditer(text):
                if not _exists(path, match.group(1), names):
                    missing.append(f"{_where(path, text, match.start())}: {match.group(1)}")
    assert not missing, "names of files that are not in the repository:\n" + "\n".join(missing)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (links there are code, not links)."""
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            kept.append("")
        else:
            kept.append("" if inside else line)
    return "\n".join(kept)


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*$", _prose(path.read_text("utf-8")), re.M)
    return {_anchor(heading) for heading in headings}


def test_markdown_links_resolve(files):
    broken = []
    markdown = [path for path in files if path.suffix == ".md"]
    assert ROOT / "README.md" in markdown
    for path in markdown:
        text = _prose(path.read_text(encoding="utf-8"))
        for match in LINK.finditer(text):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            name, _, fragment = target.partition("#")
            resolved = (path.parent / name).resolve() if name else path
            if not resolved.exists() or ROOT not in [resolved, *resolved.parents]:
                broken.append(f"{_where(path, text, match.start())}: {target}")
            elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
                broken.append(f"{_where(path, text, match.start())}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_the_design_notes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/design.md)" in readme
    assert "](CHANGELOG.md)" in readme


def test_version_is_the_installed_one():
    try:
        installed = importlib.metadata.version("numbabn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("numbabn is not installed")
    assert numbabn.__version__ == installed, "reinstall numbabn (pip install -e .)"


def test_version_is_the_changelog_latest():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d[^\]]*)\]", changelog, re.M)
    assert released, "CHANGELOG.md lists no released version"
    assert released[0] == numbabn.__version__


def test_version_is_defined_once():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "numbabn.__version__"}


def test_the_minimum_numba_and_numba_cuda_are_those_the_cuda_backend_checks():
    from numbabn._dispatch import CUDA_REQUIREMENTS

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    numba, numba_cuda = CUDA_REQUIREMENTS["numba"], CUDA_REQUIREMENTS["numba-cuda"]
    assert f"numba>={numba}" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert f"numba-cuda[cu12]>={numba_cuda}" in extras["cuda"]
    assert f"numba-cuda>={numba_cuda}" in extras["test"]


def test_the_package_holds_the_library_only():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["numbabn*"]
    assert not list(ROOT.glob("numbabn/bench/*.py")), "the benchmarks live in tools/bench/"


TOOLS_IMPORT = re.compile(r"^\s*(?:from|import)\s+tools\b", re.M)


def test_the_library_does_not_import_the_tools():
    found = [
        f"{_where(path, text, match.start())}: {match.group(0).strip()!r}"
        for path in sorted((ROOT / "numbabn").rglob("*.py"))
        for text in [path.read_text(encoding="utf-8")]
        for match in TOOLS_IMPORT.finditer(text)
    ]
    assert not found, "the library imports the checkout's tools:\n" + "\n".join(found)
