"""``python -m numbabn warmup``: it compiles everything a wide mix of calls needs.

The slow tests warm an empty cache up for float32 once, under ``mpiexec -n 3``
(all ranks at once on the one cache), then run a wide mix of float32 calls in a
fresh process: every kernel must come from the cache, none be compiled. The same
for bfloat16 data (into float32 modules, as mixed precision has them), warmed
up in one process.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numbabn import warmup
from numbabn.__main__ import cli

HERE = Path(__file__).parent
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
RANKS = 3
TIMEOUT = 1200  # seconds; a cold float32 warm-up takes a few minutes on two cores

# Run in a fresh interpreter over the warmed cache: many layouts, train and eval, fused
# ReLU with and without a residual, out=, backward, small and > 128 Ki-element tensors,
# the functional API and ChannelStats, with other shapes than the warm-up's. Data of the
# dtype named by the second argument, modules (parameters) of its parameter dtype.
MIX = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import layouts_for, make_input
import numbabn as nbn
from numbabn import functional as F
from numbabn._cpu.halves import bfloat16
from numbabn._cpu.jit import DISPATCHERS
from numbabn._validation import PARAM_DTYPES
from numbabn.warmup import compile_counts

rng = np.random.default_rng(1)
data_dtype = bfloat16() if sys.argv[2] == "bfloat16" else np.dtype(sys.argv[2])
dtype = PARAM_DTYPES[data_dtype]
for shape in [(3, 5, 7, 9), (4, 24, 40, 40)]:
    for layout in layouts_for(4):
        x = make_input(rng, shape, layout, data_dtype)
        for dy_layout in dict.fromkeys((layout, "contiguous")):
            dy = make_input(rng, shape, dy_layout, data_dtype)
            z = make_input(rng, shape, dy_layout, data_dtype)
            for activation, residual in ((None, None), ("relu", None), ("relu", z)):
                bn = nbn.BatchNorm2d(shape[1], activation=activation, dtype=dtype)
                for training in (True, False):
                    bn.train(training)
                    bn(x, residual=residual)
                    bn.backward(dy)
        nbn.ChannelStats(shape[1]).update(x)
        y, saved = F.batch_norm_forward(x, None, None, training=True)
        F.batch_norm_backward(dy, x, saved, np.ones(shape[1], dtype))
        # out= laid out like the input, in the forward and the backward.
        bn = nbn.BatchNorm2d(shape[1], momentum=None, dtype=dtype)
        dy = make_input(rng, shape, layout, data_dtype)
        out = make_input(rng, shape, layout, data_dtype)
        bn(x, out)
        bn.backward(dy, out)
        bn.eval()
        bn(x, out)
        bn.backward(dy, out)
for shape in [(1000, 7), (300000, 3), (6, 5, 11), (3, 4, 50000)]:
    for layout in layouts_for(len(shape)):
        bn = nbn.BatchNorm1d(shape[1], dtype=dtype)
        x = make_input(rng, shape, layout, data_dtype)
        bn(x)
        bn.backward(make_input(rng, shape, "contiguous", data_dtype))
        bn.eval()
        bn(x)
        bn.backward(make_input(rng, shape, layout, data_dtype))
x = make_input(rng, (2, 3, 4, 5, 6), "channels_last", data_dtype)
bn = nbn.LazyBatchNorm3d(dtype=dtype)
bn(x)
bn.backward(np.ones_like(x))

compiled, loaded = compile_counts()
for dispatcher in DISPATCHERS:
    for signature, count in dispatcher.stats.cache_misses.items():
        print(f"compiled: {dispatcher.py_func.__qualname__}{signature}")
print(f"compiled {compiled}, loaded {loaded}")
"""


def _run(command: list[str], cache: Path, **environment: str) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), **environment}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An empty cache warmed up for float32, by 3 MPI ranks at once when mpiexec exists."""
    cache = tmp_path_factory.mktemp("numba_cache")
    command = [sys.executable, "-m", "numbabn", "warmup", "--dtype", "float32", "--quiet"]
    if MPIEXEC is not None:
        command = [MPIEXEC, "-n", str(RANKS), *command]
    # One Numba thread per rank: the ranks share the machine's cores.
    return cache, _run(command, cache, NUMBA_NUM_THREADS="1")


@pytest.mark.long
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
def test_ranks_warm_up_an_empty_shared_cache_at_once(warm_cache):
    """Every rank finishes; one compiles and, after it, the others load what it saved."""
    _, printed = warm_cache
    counts = re.findall(r"(\d+) kernel signatures compiled, (\d+) loaded", printed)
    assert len(counts) == RANKS, printed
    compiled = sorted(int(n) for n, _ in counts)
    assert compiled[:-1] == [0] * (RANKS - 1) and compiled[-1] > 0, printed


@pytest.mark.long
def test_nothing_compiles_after_warmup(warm_cache):
    """A wide mix of float32 calls in a fresh process loads every kernel from the cache."""
    cache, _ = warm_cache
    printed = _run([sys.executable, "-c", MIX, str(HERE), "float32"], cache)
    assert "compiled 0," in printed, printed
    assert int(re.search(r"loaded (\d+)", printed)[1]) > 0, printed


@pytest.fixture(scope="module")
def warm_bfloat16_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty cache warmed up for bfloat16 data."""
    pytest.importorskip("ml_dtypes")
    cache = tmp_path_factory.mktemp("numba_cache")
    _run([sys.executable, "-m", "numbabn", "warmup", "--dtype", "bfloat16", "--quiet"], cache)
    return cache


@pytest.mark.long
def test_nothing_compiles_after_a_bfloat16_warmup(warm_bfloat16_cache):
    """The same mix on bfloat16 data, into float32 modules, after ``--dtype bfloat16``."""
    printed = _run([sys.executable, "-c", MIX, str(HERE), "bfloat16"], warm_bfloat16_cache)
    assert "compiled 0," in printed, printed
    assert int(re.search(r"loaded (\d+)", printed)[1]) > 0, printed


def test_rejects_other_dtypes():
    with pytest.raises(ValueError, match="int8"):
        warmup.warmup(("int8",))


def test_command_line(capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["warmup", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert "--dtype" in help_text and "bfloat16" in help_text and "float16" in help_text
    with pytest.raises(SystemExit):
        cli(["warmup", "--dtype", "int8"])
    assert "invalid choice" in capsys.readouterr().err


def test_text_progress():
    """Without tqdm: one line per step, ``[ 7/24] label 1.9 s``."""
    stream = io.StringIO()
    progress = warmup._TextProgress(24, stream)
    progress.finish("float32 threaded backward (channels-last)", 1.94)
    assert stream.getvalue() == "[ 1/24] float32 threaded backward (channels-last) 1.9 s\n"


def test_summary_names_the_cache():
    report = warmup.WarmupReport({"float32": 12.0}, 12.5, 3, 4, "/cache")
    assert "float32: 12.0 s" in report.summary()
    assert "/cache" in report.summary()
    assert np.isfinite(report.total_seconds)


# The concurrent-saves test: the index of one cached function, in a process of its own.
INDEX = """
import os, sys, time
from numba import njit
from numbabn import _source_stamp
directory = sys.argv[1]
sys.path.insert(0, directory)
import cached_target
dispatcher = _source_stamp.stamp(njit(cached_target.f), "test", "digest")
index = dispatcher._cache._cache_file
"""
# Save many entries into it, all processes at once, once the go file exists.
SAVER = (
    INDEX
    + """
who, count = sys.argv[2], int(sys.argv[3])
while not os.path.exists(os.path.join(directory, "go")):
    time.sleep(0.001)
for k in range(count):
    _source_stamp._save_entry(index, (who, k), k)
"""
)
# Print how many entries it holds and how many data files they name.
READER = (
    INDEX
    + """
entries = _source_stamp._entries(index)
print(len(entries), len({name for name, _ in entries.values()}))
"""
)


@pytest.mark.slow
def test_concurrent_saves_into_one_index_keep_every_entry(tmp_path):
    """Processes adding entries to one cache index at once lose none (Numba alone would)."""
    (tmp_path / "cached_target.py").write_text("def f(x):\n    return x\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    savers, count = 4, 150
    processes = [
        subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), f"p{i}", str(count)], env=env)
        for i in range(savers)
    ]
    (tmp_path / "go").touch()
    assert [process.wait(timeout=TIMEOUT) for process in processes] == [0] * savers
    printed = _run([sys.executable, "-c", READER, str(tmp_path)], tmp_path / "cache")
    assert printed.split() == [str(savers * count)] * 2, "entries or data files lost"
