"""The one door into the backends: only the dispatch layer imports a backend package.

Everything above :mod:`numbabn._dispatch` (the functional API, the modules,
SyncBatchNorm, numbabn.dask, ChannelStats, the warm-up) reaches a backend
through the ``Backend`` protocol it returns, never by importing
``numbabn._cpu`` or ``numbabn._cuda``; nor does it ask which backend it holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("numbabn._cpu", "numbabn._cuda")
# The door itself and the backend packages.
DOOR = {"numbabn/_dispatch.py"}
INSIDE = ("numbabn/_cpu/", "numbabn/_cuda/")
# Files outside the library that look inside a backend on purpose, each with why.
EXCEPTIONS = {
    "tools/bench/catalogue.py": "compiles each CUDA kernel on its own, for the static checks",
    "tools/bench/gpu.py": "allocates the timed device arrays as the backend does",
    "tools/bench/gpu_check.py": "allocates the checked device arrays as the backend does",
    "tools/bench/kernel_calls.py": "allocates the traced device arrays as the backend does",
    "benchmarks/bench_batchnorm.py": "asks whether the CUDA kernels run in the simulator",
}
SCANNED = ("numbabn", "examples", "benchmarks", "tools")


def _sources() -> list[Path]:
    return sorted(
        path
        for folder in SCANNED
        if (ROOT / folder).is_dir()
        for path in (ROOT / folder).rglob("*.py")
    )


def _backend_imports(path: Path) -> list[str]:
    """The backend modules ``path`` imports, with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if any(name == backend or name.startswith(backend + ".") for backend in BACKENDS):
                found.append(f"{name} (line {node.lineno})")
                break
    return found


def test_only_the_dispatch_layer_imports_a_backend():
    offenders = {}
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        if relative in DOOR or relative.startswith(INSIDE) or relative in EXCEPTIONS:
            continue
        imports = _backend_imports(path)
        if imports:
            offenders[relative] = imports
    assert not offenders, (
        "only numbabn/_dispatch.py may import a backend package; reach the backend through "
        f"the Backend protocol instead: {offenders}"
    )


@pytest.mark.parametrize("relative", sorted(EXCEPTIONS))
def test_named_exceptions_still_need_their_import(relative):
    """An exception that no longer imports a backend is removed from the list."""
    assert _backend_imports(ROOT / relative), f"{relative} no longer needs its exception"


def test_no_code_above_the_door_asks_which_backend_it_holds():
    """Nothing outside the backends compares a backend's name or checks its class."""
    offenders = []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        if relative in DOOR or relative.startswith(INSIDE) or not relative.startswith("numbabn/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Attribute) and side.attr == "name":
                        owner = side.value
                        if isinstance(owner, ast.Name) and "backend" in owner.id:
                            offenders.append(f"{relative}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and any(
                    isinstance(arg, ast.Name) and arg.id.endswith("Backend") for arg in node.args
                )
            ):
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, f"backend-specific branches above the door: {offenders}"
