"""The kernel cache can never break a run, and one cache serves every install of the sources.

Each test runs one small workload (a float64 ``BatchNorm2d`` forward and
backward in training mode) in a fresh interpreter over a cache in some state,
and compares what it computed, bit for bit, with a run over a healthy cache. The
interpreter counts Numba's compilations (its ``numba:compile`` events) and
loads from the cache. A read-only folder is one without write permission, or
where the tests run as root (who may write anywhere) a read-only bind mount of
it in a mount namespace of the interpreter's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import numbabn

PACKAGE = Path(numbabn.__file__).resolve().parent
ROOT = PACKAGE.parent
TIMEOUT = 300
# Each test runs a fresh process that compiles into a cache of its own.
pytestmark = pytest.mark.slow
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# As root: run the command with ``$0`` bind-mounted read-only over itself.
READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'

# The workload, after the fault (argv[1]) is set up; it prints what it computed and counted.
WORKLOAD = r"""
import errno, hashlib, json, os, signal, sys

fault = sys.argv[1]
if fault == "enospc":
    # A full disk: every file opened for writing in the cache takes no byte.
    import builtins

    real_open = builtins.open
    root = os.environ["NUMBA_CACHE_DIR"]

    class Full:
        def __init__(self, handle):
            self._handle = handle
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def __getattr__(self, name):
            return getattr(self._handle, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._handle.close()

    def open_full(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file).startswith(root) and set(mode) & set("wax+"):
            return Full(handle)
        return handle

    builtins.open = open_full
elif fault.startswith("kill-at-rename-"):
    # Killed while saving: at the n-th file the cache renames into place.
    real_replace, renames = os.replace, [0]

    def replace(source, target, *args, **kwargs):
        renames[0] += 1
        if renames[0] == int(fault.rsplit("-", 1)[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(source, target, *args, **kwargs)

    os.replace = replace

import numpy as np
from numba.core import event

import numbabn as nbn
from numbabn.warmup import compile_counts

with event.install_recorder("numba:compile") as recorder:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    bn = nbn.BatchNorm2d(3, dtype=np.float64)
    y = bn(x)
    dx = bn.backward(np.cos(x))
digest = hashlib.sha256()
for array in (y, dx, bn.running_mean, bn.running_var, bn.grads["weight"], bn.grads["bias"]):
    digest.update(np.ascontiguousarray(array).tobytes())
missed, loaded = compile_counts()
print(json.dumps({
    "results": digest.hexdigest(),
    "compiled": sum(1 for _, record in recorder.buffer if record.is_start),
    "missed": missed, "loaded": loaded, "package": os.path.dirname(nbn.__file__),
}))
"""


@dataclass
class Run:
    results: str  # SHA-256 of everything the workload computed
    compiled: int  # Numba's compilations, numbabn's kernels and anything they needed
    missed: int  # numbabn's kernels not found in the cache
    loaded: int  # numbabn's kernels loaded from the cache
    package: str
    warnings: list[str]


def run_workload(
    cache: Path | None,
    fault: str = "none",
    package_parent: Path = ROOT,
    home: Path | None = None,
    read_only: Path | None = None,
) -> Run:
    """Run the workload in a fresh interpreter with ``NUMBA_CACHE_DIR=cache`` (unset if None).

    ``read_only`` names a folder that the interpreter cannot write to.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("XDG_")}
    env.pop("NUMBA_CACHE_DIR", None)
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = str(package_parent)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if home is not None:
        env["HOME"] = str(home)
    command = [sys.executable, "-c", WORKLOAD, fault]
    if read_only is not None:
        for path in [read_only, *read_only.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        if AS_ROOT:
            if shutil.which("unshare") is None:
                pytest.skip("as root, a read-only folder needs unshare and a bind mount")
            unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
            command = [*unshare, READ_ONLY_MOUNT, str(read_only), *command]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env=env,
        cwd=tempfile.gettempdir(), check=False,
    )  # fmt: skip
    if fault.startswith("kill-at-rename-"):
        assert result.returncode == -9, result.stderr
        return Run("", 0, 0, 0, "", [])
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    found = [line for line in result.stderr.splitlines() if ": KernelCacheWarning: " in line]
    return Run(**printed, warnings=found)


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    """A folder everyone may read (tmp_path is its owner's alone), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="numbabn-cache-test-"))
    path.chmod(0o755)
    yield path
    for folder in path.rglob("*"):  # read-only folders of the tests
        if folder.is_dir() and not folder.is_mount():
            folder.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def healthy(workspace: Path) -> tuple[Path, Run]:
    """A cache filled by the workload, and that first run (which compiled everything)."""
    cache = workspace / "healthy"
    first = run_workload(cache)
    assert first.compiled >= first.missed > 0 and first.loaded == 0 and not first.warnings
    return cache, first


def _copy(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to)
    return to


def _cache_files(cache: Path, suffix: str) -> list[Path]:
    found = sorted(cache.rglob(f"*{suffix}"))
    assert found, f"no {suffix} file in {cache}"
    return found


def _warned_once(run: Run) -> None:
    assert len(run.warnings) == 1, run.warnings
    assert "NUMBA_CACHE_DIR" in run.warnings[0]


# -- a healthy cache, and one cache for every install ---------------------------------------


def test_a_second_run_compiles_nothing(healthy):
    cache, first = healthy
    again = run_workload(cache)
    assert (again.compiled, again.loaded) == (0, first.missed)
    assert again.results == first.results and not again.warnings


def test_a_second_install_elsewhere_compiles_nothing(healthy, workspace):
    """The same sources at another path, sharing NUMBA_CACHE_DIR, load every kernel."""
    cache, first = healthy
    elsewhere = workspace / "second-install" / "site-packages"
    shutil.copytree(PACKAGE, elsewhere / "numbabn", ignore=shutil.ignore_patterns("__pycache__"))
    second = run_workload(_copy(cache, workspace / "shared-by-installs"), package_parent=elsewhere)
    assert Path(second.package) == elsewhere / "numbabn"
    assert (second.compiled, second.loaded) == (0, first.missed)
    assert second.results == first.results


def test_other_sources_share_no_entry(healthy, workspace):
    """A change to any source (here a comment) gives a cache of its own: everything compiles."""
    cache, first = healthy
    changed = workspace / "changed-install"
    shutil.copytree(PACKAGE, changed / "numbabn", ignore=shutil.ignore_patterns("__pycache__"))
    with open(changed / "numbabn" / "_coefficients.py", "a") as source:
        source.write("# changed\n")
    shared = _copy(cache, workspace / "shared-by-versions")
    other = run_workload(shared, package_parent=changed)
    assert (other.missed, other.loaded) == (first.missed, 0)
    assert other.results == first.results
    assert len([path for path in shared.iterdir() if path.name.startswith("numbabn._cpu-")]) == 2


def test_nothing_is_written_beside_the_sources(healthy, workspace):
    """Without NUMBA_CACHE_DIR the cache goes to the user's cache directory, not site-packages."""
    _, first = healthy
    home = workspace / "home"
    installed = workspace / "user-install"
    shutil.copytree(PACKAGE, installed / "numbabn", ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(path.relative_to(installed) for path in installed.rglob("*"))
    run = run_workload(None, package_parent=installed, home=home)
    assert run.results == first.results and not run.warnings
    assert sorted(path.relative_to(installed) for path in installed.rglob("*")) == before
    assert list((home / ".cache" / "numbabn").glob("numbabn._cpu-*/*.nbi"))


# -- faults: every call works, bit for bit, with at most one warning -----------------------


def test_read_only_cache_dir_compiles_in_memory(healthy, workspace):
    _, first = healthy
    empty = workspace / "read-only-empty"
    empty.mkdir()
    run = run_workload(empty, read_only=empty)
    assert run.results == first.results and run.missed == first.missed
    _warned_once(run)


def test_read_only_warm_cache_loads_without_a_warning(healthy, workspace):
    """An image's pre-filled cache, mounted read-only: every kernel loads, nothing is written."""
    cache, first = healthy
    frozen = _copy(cache, workspace / "read-only-warm")
    run = run_workload(frozen, read_only=frozen)
    assert (run.compiled, run.loaded) == (0, first.missed)
    assert run.results == first.results and not run.warnings


def test_cache_dir_that_is_a_regular_file(healthy, workspace):
    _, first = healthy
    regular = workspace / "a-regular-file"
    regular.write_text("not a directory\n")
    run = run_workload(regular)
    assert run.results == first.results
    _warned_once(run)


def test_full_disk(healthy, workspace):
    """Every write into the cache fails with ENOSPC (No space left on device)."""
    _, first = healthy
    run = run_workload(workspace / "full-disk", fault="enospc")
    assert run.results == first.results
    _warned_once(run)
    assert "No space left on device" in run.warnings[0]


def test_no_writable_location_at_all(healthy, workspace):
    """No NUMBA_CACHE_DIR, and a home whose cache directory cannot be made."""
    _, first = healthy
    home = workspace / "read-only-home"
    home.mkdir()
    run = run_workload(None, home=home, read_only=home)
    assert run.results == first.results
    _warned_once(run)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(max(path.stat().st_size, 64)))


@pytest.mark.parametrize(
    ("damage", "suffixes"),
    [
        (_truncate, (".nbi", ".nbc")),
        (_garbage, (".nbi", ".nbc")),
        (_garbage, (".nbc",)),
        (Path.unlink, (".nbi",)),
    ],
    ids=["every-file-truncated", "every-file-garbage", "data-files-garbage", "index-deleted"],
)
def test_damaged_cache_is_compiled_afresh_and_repaired(healthy, workspace, damage, suffixes):
    cache, first = healthy
    damaged = _copy(cache, workspace / f"damaged-{damage.__name__}-{'-'.join(suffixes)}")
    for suffix in suffixes:
        for path in _cache_files(damaged, suffix):
            damage(path)
    run = run_workload(damaged)
    assert (run.missed, run.results) == (first.missed, first.results) and not run.warnings
    repaired = run_workload(damaged)
    assert (repaired.compiled, repaired.results) == (0, first.results)


def test_process_killed_while_saving(healthy, workspace):
    """Killed after one full entry and the data file of the next (its index not yet saved)."""
    _, first = healthy
    cache = workspace / "killed"
    run_workload(cache, fault="kill-at-rename-4")
    assert len(_cache_files(cache, ".nbi")) == 1 and len(_cache_files(cache, ".nbc")) == 2
    after = run_workload(cache)
    assert (after.missed, after.loaded) == (first.missed - 1, 1)
    assert after.results == first.results and not after.warnings
    assert run_workload(cache).compiled == 0


def test_warmup_into_an_unwritable_cache_says_what_to_do(workspace):
    """The warm-up exists to fill the cache: where it cannot, it stops at once and says why."""
    regular = workspace / "warmup-into-a-file"
    regular.write_text("not a directory\n")
    result = subprocess.run(
        [sys.executable, "-m", "numbabn", "warmup", "--dtype", "float32", "--quiet"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
        env={**os.environ, "NUMBA_CACHE_DIR": str(regular), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot write the kernel cache in" in result.stderr
    assert "Set NUMBA_CACHE_DIR to a writable directory" in result.stderr
