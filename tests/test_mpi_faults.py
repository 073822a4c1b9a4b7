"""SyncBatchNorm under ``mpiexec -n 3`` when one rank misbehaves: clear errors, no hangs.

Each scenario of ``mpi/fault_workload.py`` makes rank 2 fail in one way (a bad
input mid-forward or mid-backward, an unexpected exception inside a kernel, a
backward without a forward, a different module, eval mode while the others
train) or feed NaN or infinite data. Every rank prints what it raised; these
tests check all three lines. The scenarios share two launches (each start of
``mpiexec`` and the imports cost seconds); the exchange timeout inside the
workload and the launch's subprocess timeout keep a hang from blocking the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import numbabn as nbn

pytest.importorskip("mpi4py")
HERE = Path(__file__).parent
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
RANKS = 3
ODD = RANKS - 1
LAUNCH_TIMEOUT = 300  # seconds; a healthy launch takes 5-15 s (more while kernels compile)

KEPT = r" \| state kept \| recovered"
TIMEOUT = r"ExchangeTimeout: SyncBatchNorm forward: not every rank joined .* within 3 s\. .*"
OUT_OF_STEP = r"ExchangeTimeout: an earlier SyncBatchNorm exchange on this communicator timed out.*"
# Ranks 0 and 1 quote rank 2's error, whatever its text.
QUOTED = "quoted"

# scenario: (what rank 2 prints, what ranks 0 and 1 print), as regular expressions.
# The texts of the argument checks are the single-process modules' (tested elsewhere).
EXPECTED = {
    "forward_channels": (
        r"RuntimeError: running_mean should contain 3 elements not 4\. numbabn takes .*" + KEPT,
        QUOTED,
    ),
    "forward_dtype": (r"(TypeError|RuntimeError): .*(dtype|scalar type).*" + KEPT, QUOTED),
    "forward_raises": ("InjectedFault: moments failed" + KEPT, QUOTED),
    "module_channels": (
        r"ValueError: SyncBatchNorm ranks disagree on the input \(rank 0: 4 channels float64, "
        r"rank 1: 4 channels float64, rank 2: 3 channels float64\) \| state kept",
    )
    * 2,
    "module_dtype": (
        r"ValueError: SyncBatchNorm ranks disagree on the input \(rank 0: 4 channels float64, "
        r"rank 1: 4 channels float64, rank 2: 4 channels float32\) \| state kept",
    )
    * 2,
    "backward_shape": (r"ValueError: grad_output has shape \(2, 4, 3, 5\) .*" + KEPT, QUOTED),
    "backward_raises": ("InjectedFault: grad_sums failed" + KEPT, QUOTED),
    "backward_without_forward": ("RuntimeError: backward called before forward.*" + KEPT, QUOTED),
    "out_of_step": (
        r"RuntimeError: SyncBatchNorm ranks are out of step "
        r"\(rank 0: forward, rank 1: forward, rank 2: backward\)" + KEPT,
    )
    * 2,
    "failed_eval_forward": (r"eval error: \w+: .* \| ok", "ok"),
    "nan_data": (r"ok nan in channel 2 only \| recovered",) * 2,
    "inf_data": (r"ok nan in channel 0 only \| recovered",) * 2,
    "eval_mixed": (
        r"eval ok \| then " + TIMEOUT,
        TIMEOUT + r" \| state kept \| then " + OUT_OF_STEP,
    ),
    # Last in its launch: after all the faults above, a correct step works everywhere.
    "in_step": (r"ok recovered",) * 2,
}
# eval_mixed leaves COMM_WORLD out of step, so it runs in a launch of its own.
LAUNCHES = ([name for name in EXPECTED if name != "eval_mixed"], ["eval_mixed"])


@cache
def launch(index: int) -> tuple[dict[tuple[int, str], str], str]:
    """Run launch ``index`` once: ``({(rank, scenario): outcome}, everything it printed)``.

    A launch that hangs or fails is not run again for the next scenario: its
    scenarios all report what it printed.
    """
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    script = str(HERE / "mpi" / "fault_workload.py")
    command = [MPIEXEC, "-n", str(RANKS), sys.executable, script, *LAUNCHES[index]]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env
        )
    except subprocess.TimeoutExpired as error:
        stdout = error.stdout or b""
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
        printed = f"mpiexec hung for {LAUNCH_TIMEOUT} s; it printed:\n{stdout}"
    else:
        stdout = result.stdout
        printed = f"exit status {result.returncode}\n{result.stdout}{result.stderr}"
    lines = re.findall(r"^rank (\d+): (\w+): (.*)$", stdout, flags=re.MULTILINE)
    return {(int(rank), name): text for rank, name, text in lines}, printed


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_every_rank_gets_a_clear_outcome(scenario):
    index = next(i for i, names in enumerate(LAUNCHES) if scenario in names)
    outcomes, printed = launch(index)
    odd, others = EXPECTED[scenario]
    got = [outcomes.get((rank, scenario)) for rank in range(RANKS)]
    for rank, text in enumerate(got):
        assert text is not None, f"rank {rank} printed nothing for {scenario}:\n{printed}"
    assert re.fullmatch(odd, got[ODD]), f"rank {ODD}: {got[ODD]!r}\nexpected {odd!r}"
    if others == QUOTED:
        error = got[ODD].split(" | ")[0]
        others = (
            rf"_RankFailed: SyncBatchNorm failed on another rank \(rank 2: {re.escape(error)}\)"
        )
        others += KEPT
    for rank in range(ODD):
        assert re.fullmatch(others, got[rank]), f"rank {rank}: {got[rank]!r}\nexpected {others!r}"


def test_launches_cover_every_scenario():
    workload = (HERE / "mpi" / "fault_workload.py").read_text()
    assert sorted(sum(LAUNCHES, [])) == sorted(EXPECTED)
    for name in EXPECTED:
        assert f"def {name}()" in workload


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_timeout_must_be_positive(timeout):
    from mpi4py import MPI

    with pytest.raises(ValueError, match="timeout must be a positive number"):
        nbn.SyncBatchNorm(3, timeout=timeout, comm=MPI.COMM_SELF)


def test_waiting_forever_or_with_a_timeout_gives_the_same_bits():
    from mpi4py import MPI

    x = np.random.default_rng(3).standard_normal((5, 3, 4))
    results = []
    for timeout in (None, 10.0):
        module = nbn.SyncBatchNorm(3, dtype=np.float64, timeout=timeout, comm=MPI.COMM_SELF)
        results.append((module(x), module.backward(np.cos(x)), module.running_var.copy()))
    for a, b in zip(*results, strict=True):
        assert a.tobytes() == b.tobytes()
