"""Sphinx configuration of numbabn's documentation (``make docs`` builds it into docs/_build)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's numbabn, and docs/_ext
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import numbabn  # noqa: E402

project = "numbabn"
author = "The numbabn developers"
copyright = "2026, The numbabn developers"
release = version = numbabn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings are NumPy-style
    "bench_plots",  # docs/_ext: the bench's plots, drawn from its committed tables
]
exclude_patterns = ["_build", "design.md"]
nitpicky = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"numbabn {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "PyTorch's batch normalization for NumPy, on Numba kernels",
    "fixed_sidebar": True,
    "page_width": "1160px",
    "show_relbars": True,
}
