"""What a user installs: the wheel, the sdist and their metadata; and ``make help``.

The sdist and the wheel are built once (without build isolation, so offline), with no
warning. The wheel holds the library alone; the sdist holds what its tests need, and its
tests collect and run from the unpacked sdist.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import numbabn

ROOT = Path(__file__).resolve().parent.parent
NAME = f"numbabn-{numbabn.__version__}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The folder holding the sdist and the wheel, and what the build printed."""
    pytest.importorskip("build", reason="the build package makes the sdist and wheel")
    output = tmp_path_factory.mktemp("dist")
    # Without byte-compiling, setuptools warns that it is disabled.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(output), str(ROOT)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return output, result.stdout + result.stderr


def _wheel(built: tuple[Path, str]) -> zipfile.ZipFile:
    return zipfile.ZipFile(built[0] / f"{NAME}-py3-none-any.whl")


def test_build_warns_of_nothing(built):
    _, printed = built
    warnings = [line for line in printed.splitlines() if re.search(r"warn|deprecat", line, re.I)]
    assert not warnings, "\n".join(warnings)


def test_wheel_holds_the_library_and_its_licence(built):
    names = _wheel(built).namelist()
    outside = [name for name in names if not name.startswith(("numbabn/", f"{NAME}.dist-info/"))]
    assert not outside, outside
    assert "numbabn/py.typed" in names and "numbabn/_cpu/kernels.py" in names
    assert f"{NAME}.dist-info/licenses/LICENSE" in names
    assert not [name for name in names if name.endswith((".nbi", ".nbc", ".pyc"))]


def test_metadata(built):
    metadata = email.message_from_bytes(_wheel(built).read(f"{NAME}.dist-info/METADATA"))
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["Author"]
    classifiers = metadata.get_all("Classifier")
    for prefix in ("Programming Language :: Python :: 3.1", "Operating System ::", "Topic ::"):
        assert any(line.startswith(prefix) for line in classifiers), prefix
    urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    requirements = metadata.get_all("Requires-Dist")
    torch = [line.split(";")[0] for line in requirements if line.startswith("torch")]
    assert torch and not [line for line in torch if "==" in line], torch


def test_the_test_oracle_is_pinned_in_the_constraints():
    assert re.search(r"^torch==\d", (ROOT / "tests/constraints.txt").read_text(), re.M)


@pytest.mark.slow
def test_sdist_tests_run_from_the_unpacked_sdist(built, tmp_path):
    """Every test module collects, and two of them run, with the sdist's own numbabn."""
    with tarfile.open(built[0] / f"{NAME}.tar.gz") as sdist:
        sdist.extractall(tmp_path, filter="data")
    unpacked = tmp_path / NAME
    for needed in ("LICENSE", "tests/conftest.py", "tests/reference.py", "docs/conf.py"):
        assert (unpacked / needed).is_file(), needed
    found = subprocess.run(
        [sys.executable, "-c", "import numbabn; print(numbabn.__file__)"],
        capture_output=True, text=True, cwd=unpacked, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert Path(found.strip()).is_relative_to(unpacked)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "test_argument_checks or test_edge_cases"],
        capture_output=True, text=True, cwd=unpacked, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout)


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    helped = set(re.findall(r"^## ([a-z][a-z-]*): \S", makefile, re.M))
    assert targets == helped, f"without a ## line: {targets - helped}"
    assert "help" in targets
