"""The README's and the guide's code pass ``mypy --strict``: NumPy in types as NumPy out.

Every Python block that runs stand-alone (the ones the other documentation tests run)
is written to a file of its own and checked strictly, as a reader's own script would
be; numbabn's sources are read for their annotations only (an installed package's
internals are not the reader's to fix). ``make lint`` runs this check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import BLOCKS as GUIDE_BLOCKS
from test_readme import README, readme_blocks

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
[mypy]
strict = True
python_version = 3.10

[mypy-numbabn.*]
follow_imports = silent

[mypy-numba.*,llvmlite.*,mpi4py.*,cupy.*]
ignore_missing_imports = True

# Partly annotated libraries whose untyped calls are not the reader's to fix.
[mypy-torch.*,matplotlib.*,dask.*,distributed.*,zarr.*]
ignore_missing_imports = True
follow_imports = skip
"""


@pytest.mark.lint
def test_documented_code_passes_strict_mypy(tmp_path):
    sources = {
        f"readme_l{block.line}": block.code
        for block in readme_blocks(README.read_text(encoding="utf-8"))
        if block.skip is None
    }
    sources.update(
        (f"{block.path.stem}_l{block.line}", block.code)
        for block in GUIDE_BLOCKS
        if block.skip is None
    )
    assert len(sources) >= 15
    for name, code in sources.items():
        (tmp_path / f"{name}.py").write_text(code + "\n", encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text(CONFIG, encoding="utf-8")
    files = sorted(map(str, tmp_path.glob("*.py")))
    cache = ROOT / ".mypy_cache" / "docs"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary",
         "--cache-dir", str(cache), *files],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
