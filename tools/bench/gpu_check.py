"""``python -m tools.bench.gpu_check --out DIR``: every GPU check in one run of under 8 minutes.

Made for a GPU machine that is lent for minutes and has no network (``make
gpu-check OUT=DIR``): its own Python with numpy, numba-cuda and pytest (PyTorch
and CuPy where present). The steps, in order, each with a time budget:

- ``versions``: Python, the libraries, the CUDA driver and runtime, nvidia-smi,
  ``numba.cuda.detect()``, and whether numbabn's CUDA modules import: if they do
  not, or Numba finds no GPU, the run stops there, in seconds;
- ``tests-cuda``, ``tests-semantic``: the CUDA tests on the GPU at the real grid
  sizes, then the semantic tests' CUDA cases (JUnit XML into DIR);
- ``nan-probe``: NaN and infinities in every input of the training, fused and
  eval passes, GPU against the CPU backend (the GPU's float min/max drop NaN,
  which the simulator hides);
- ``kernels``, ``racecheck``, ``memcheck``: one small call of every pass in every
  kernel family (:mod:`tools.bench.kernel_calls`: rows, channels-inner, wide rows,
  planar; the fused backward among the passes), plainly and under compute-sanitizer;
- ``repeat``: each pass 1,000 times in a row, every result with the bits of the
  first (a race in a reduction's merge would show as a differing run);
- ``sync-batchnorm``: SyncBatchNorm on CUDA arrays under ``mpiexec -n 2``
  (``tests/mpi/sync_workload.py``), each rank against BatchNorm on the CPU over
  the whole batch, then the same workload on host arrays;
- ``benchmark``, ``host-time``: numbabn beside PyTorch (cuDNN) and a streaming
  roofline, and the host time per small forward;
- ``cpu-threads``: the CPU kernels' training pass with 1 to 16 threads beside
  PyTorch's CPU batch norm.

Each step runs in a process of its own, killed at its deadline, so a failing,
crashing or hanging step never stops the next one. Progress is printed as it
goes and logged; the status of every step is summarised (the summary is printed
last), and every table is gathered into one report, ready to commit under
``benchmarks/results/``. The test steps report warnings rather than fail on them:
a GPU can raise warnings the simulator never does.

``--dry-run`` runs every step it can in Numba's CUDA simulator on tiny shapes,
in about a minute and a half, and skips what needs the hardware (the tests at
real grid sizes, compute-sanitizer, timing against cuDNN).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]

# What the output directory holds. (The Markdown names are spelt from their stems so
# that the repository's check of named files does not look for them in the repository.)
LOG = "log.txt"
SUMMARY = "summary" + ".md"
REPORT = "gpu" + ".md"
STEP_RESULTS = "steps"  # each step process's outcome, removed once the reports are written
# A lent GPU machine returns at most 8 files of its output folder: the run leaves 6 (the log,
# the summary, the report, the benchmark JSON and the two test steps' JUnit XML).
MAX_FILES = 6

# A step's own child processes are stopped this long before the step's deadline (so
# that it can still report what they did), and one that outlives SIGINT by
# GRACE_SECONDS is killed.
MARGIN_SECONDS = 6.0
GRACE_SECONDS = 4.0

STATUSES = ("passed", "failed", "skipped")


@dataclass
class Outcome:
    """What a step found: its status, a one-line note (the reason if skipped or failed), tables."""

    status: str
    note: str = ""
    markdown: str = ""


@dataclass
class Context:
    """What a step is given: where results go, whether this is the dry run, and its deadline."""

    out: Path
    dry_run: bool
    deadline: float  # time.time() by which the step must be done

    def seconds_left(self) -> float:
        """Seconds until the step should be done, keeping the margin for wrapping up."""
        return self.deadline - MARGIN_SECONDS - time.time()


@dataclass(frozen=True)
class Step:
    """One check: its name on the command line, its title in the report, its time budget."""

    name: str
    title: str
    budget: float  # seconds; the budgets add up to well under 8 minutes
    run: Callable[[Context], Outcome] = field(repr=False)


@dataclass
class Finished:
    """A child process's exit status and output."""

    returncode: int
    output: str
    timed_out: bool


# -- running commands ------------------------------------------------------------------


def _echo(stream: IO[str], sink: Callable[[str], None], lines: list[str]) -> None:
    # The pipe is closed under this thread if a process left behind still holds it open.
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            lines.append(line)
            sink(line.rstrip("\n"))


def run_command(
    command: list[str],
    timeout: float,
    sink: Callable[[str], None],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    own_group: bool = False,
) -> Finished:
    """Run ``command``, pass each output line to ``sink``, and stop it at ``timeout`` seconds.

    A command past its time gets SIGINT (pytest then still writes its report),
    and SIGKILL if it has not ended ``GRACE_SECONDS`` later. With ``own_group``
    it runs in a process group of its own, and the signals go to the whole group.
    """
    lines: list[str] = []
    timed_out = False
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd,
        start_new_session=own_group,
    ) as process:
        assert process.stdout is not None
        reader = threading.Thread(target=_echo, args=(process.stdout, sink, lines), daemon=True)
        reader.start()

        def signal_it(number: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                if own_group:
                    os.killpg(process.pid, number)
                else:
                    process.send_signal(number)

        try:
            process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            signal_it(signal.SIGINT)
            try:
                process.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                signal_it(signal.SIGKILL)
                process.wait()
        reader.join(timeout=GRACE_SECONDS)
    return Finished(process.returncode, "".join(lines), timed_out)


def _print_indented(line: str) -> None:
    print("  " + line, flush=True)


def _child_environment(**extra: str) -> dict[str, str]:
    """This environment with the repository importable first, and ``extra``."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cores() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _code_block(text: str) -> str:
    return "```text\n" + text.strip("\n") + "\n```"


# -- versions --------------------------------------------------------------------------


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cupy_distribution() -> str:
    names = sorted(
        f"{dist.metadata['Name']} {dist.version}"
        for dist in importlib.metadata.distributions()
        if (dist.metadata["Name"] or "").lower().startswith("cupy")
    )
    return ", ".join(names) or "not installed"


def _attempt(describe: Callable[[], object]) -> str:
    """``describe()`` as text, or what went wrong."""
    try:
        return str(describe())
    except Exception as error:  # a missing library or driver is a finding, not a failure
        return f"n/a ({type(error).__name__}: {error})"


def step_versions(context: Context) -> Outcome:
    """Python, the libraries, CUDA driver and runtime, nvidia-smi and ``numba.cuda.detect()``."""
    from numba import cuda

    from tools.bench.gpu import gpu_name

    def torch_cuda() -> str:
        import torch

        if not torch.cuda.is_available():
            return f"CUDA {torch.version.cuda}, no GPU available to PyTorch"
        device = torch.cuda.get_device_name()
        return f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {device}"

    def cupy_cuda() -> str:
        runtime = importlib.import_module("cupy").cuda.runtime
        return f"runtime {runtime.runtimeGetVersion()}, driver {runtime.driverGetVersion()}"

    def gpu() -> str:
        capability = ".".join(map(str, cuda.get_current_device().compute_capability))
        return f"{gpu_name()}, compute capability {capability}"

    def numbabn_cuda() -> str:
        from numbabn._dispatch import check_cuda_requirements

        check_cuda_requirements()  # names the minimum numba and numba-cuda if older
        from numbabn._cuda import backend, kernels

        kernels.statistics(kernels.Family.ROWS)  # the kernel factories run (no compile yet)
        return f"imports ({backend.__name__}, {kernels.__name__})"

    rows = [
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("platform", platform.platform()),
        *((name, _distribution_version(name)) for name in ("numpy", "numba", "numba-cuda")),
        ("CuPy", _cupy_distribution()),
        ("PyTorch", _distribution_version("torch")),
        ("pytest", _distribution_version("pytest")),
        ("CUDA driver (Numba)", _attempt(lambda: cuda.cudadrv.driver.driver.get_version())),
        ("CUDA runtime (Numba)", _attempt(lambda: cuda.runtime.get_version())),
        ("NVVM (Numba)", _attempt(lambda: cuda.cudadrv.nvvm.NVVM().get_version())),
        ("PyTorch CUDA", _attempt(torch_cuda)),
        ("CuPy CUDA", _attempt(cupy_cuda)),
        ("GPU (Numba)", _attempt(gpu)),
        ("numbabn CUDA modules", _attempt(numbabn_cuda)),
        ("CPU cores", _cores()),
    ]
    for name, value in rows:
        print(f"{name}: {value}", flush=True)
    detected = io.StringIO()
    with contextlib.redirect_stdout(detected):
        cuda.detect()
    print(detected.getvalue(), end="", flush=True)
    sections = [
        _table(("component", "version"), rows),
        "`numba.cuda.detect()`:",
        _code_block(detected.getvalue()),
    ]
    smi = shutil.which("nvidia-smi")
    if smi:
        finished = run_command([smi], min(30.0, context.seconds_left()), _print_indented)
        sections += ["`nvidia-smi`:", _code_block(finished.output)]
    else:
        sections.append("`nvidia-smi`: not on PATH.")
    markdown = "\n\n".join(sections)
    gpu_line = str(dict(rows)["GPU (Numba)"])
    if not cuda.is_available():
        return Outcome("failed", "Numba finds no usable GPU", markdown)
    modules = str(dict(rows)["numbabn CUDA modules"])
    if modules.startswith("n/a"):
        return Outcome("failed", f"numbabn's CUDA modules do not import: {modules}", markdown)
    return Outcome("passed", gpu_line if not gpu_line.startswith("n/a") else "", markdown)


# -- the test suite on the GPU ---------------------------------------------------------

# The CUDA tests as ``make test-gpu`` runs them, then the semantic tests' CUDA cases
# (the offline PTX check, a CPU-side compile of every kernel, stays in ``make test``).
TEST_RUNS = {
    "tests-cuda": (
        [
            "tests/test_cuda.py",
            "tests/test_cuda_arrays.py",
            "tests/test_cuda_half.py",
            "tests/test_fused.py",
        ],
        None,
    ),
    "tests-semantic": (
        ["tests/test_reference.py", "tests/test_contract.py", "tests/test_nonfinite.py"],
        "cuda and not ptx",
    ),
}


def pytest_command(name: str, junit: Path) -> list[str]:
    """The pytest command line of the test step ``name``, writing JUnit XML to ``junit``."""
    files, selection = TEST_RUNS[name]
    # -W default: a warning only a GPU raises is reported (and counted), not an error.
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"]
    command += ["-W", "default"]
    command += [f"--junitxml={junit}", *files]
    return command + (["-k", selection] if selection else [])


def _junit_cases(junit: Path) -> list[tuple[str, str, str]]:
    """``(test id, outcome, message)`` of every test case in a JUnit XML report."""
    cases = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = kind
                message = ((element.get("message") or "").splitlines() or [""])[0]
                break
        cases.append((test_id, outcome, message))
    return cases


def _tests_markdown(name: str, junit: Path, cases: list[tuple[str, str, str]]) -> str:
    counts = Counter(outcome for _, outcome, _ in cases)
    # The report names the XML file, not the directory (which may be anywhere).
    shown = shlex.join(["python", *pytest_command(name, Path(junit.name))[1:]])
    sections = [
        f"`{shown}`",
        _table(("passed", "failed", "errors", "skipped"), [
            [counts["passed"], counts["failure"], counts["error"], counts["skipped"]]
        ]),
    ]  # fmt: skip
    failed = [case for case in cases if case[1] in ("failure", "error")]
    if failed:
        rows = [(f"`{test_id}`", outcome, message[:200]) for test_id, outcome, message in failed]
        sections.append(_table(("test", "outcome", "message"), rows[:40]))
    skips = Counter(message for _, outcome, message in cases if outcome == "skipped")
    if skips:
        counted = [(count, reason[:200]) for reason, count in skips.most_common(10)]
        sections.append(_table(("skipped", "reason"), counted))
    return "\n\n".join(sections)


def _tests_step(name: str) -> Callable[[Context], Outcome]:
    def run(context: Context) -> Outcome:
        if context.dry_run:
            return Outcome(
                "skipped",
                "needs a GPU: the real grid sizes (make test runs these in the simulator)",
            )
        files, _ = TEST_RUNS[name]
        if not all((ROOT / file).exists() for file in files):
            return Outcome("skipped", "the tests are not beside these tools")
        junit = context.out / f"junit-{name}.xml"
        command = pytest_command(name, junit)
        finished = run_command(
            command, context.seconds_left(), _print_indented, _child_environment(), ROOT
        )
        if not junit.exists():
            return Outcome("failed", f"pytest wrote no report: {_last_line(finished.output)}")
        cases = _junit_cases(junit)
        counts = Counter(outcome for _, outcome, _ in cases)
        note = (
            f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
            f"{counts['skipped']} skipped"
        )
        warned = re.search(r"(\d+) warnings?\b", _last_line(finished.output))
        if warned:
            note += f", {warned.group(1)} warnings (in the log)"
        markdown = _tests_markdown(name, junit, cases)
        if finished.timed_out:
            return Outcome(
                "failed", f"stopped at its time budget after {len(cases)} tests: {note}", markdown
            )
        status = "passed" if finished.returncode == 0 else "failed"
        return Outcome(status, note, markdown)

    return run


# -- NaN and infinities: the GPU against the CPU backend -------------------------------

NAN, INF = float("nan"), float("inf")

# One scenario per channel (channels are independent, so one call tests them all; the
# last stays finite): a label and ``(input, where, value)`` entries, ``where`` being the
# channel's first, middle or last element of a tensor input ("" for a per-channel one).
PROBE_SCENARIOS: list[tuple[str, list[tuple[str, str, float]]]] = [
    ("x NaN", [("x", "middle", NAN)]),
    ("x NaN as the first value", [("x", "first", NAN)]),
    ("x +inf", [("x", "middle", INF)]),
    ("x +inf and -inf", [("x", "first", INF), ("x", "last", -INF)]),
    ("dy NaN", [("dy", "middle", NAN)]),
    ("dy -inf", [("dy", "last", -INF)]),
    ("residual NaN", [("z", "middle", NAN)]),
    ("residual +inf", [("z", "first", INF)]),
    ("weight NaN", [("weight", "", NAN)]),
    ("weight +inf", [("weight", "", INF)]),
    ("bias NaN", [("bias", "", NAN)]),
    ("bias -inf", [("bias", "", -INF)]),
    ("running_mean NaN", [("running_mean", "", NAN)]),
    ("running_var +inf", [("running_var", "", INF)]),
    ("running_var NaN", [("running_var", "", NAN)]),
    ("finite", []),
]
# (shape, dtype, channels-last): both kernel families, float32 and float64, one block
# and many (the non-finite values then fall in a later chunk than the first).
PROBE_CASES = [
    ((4, 16, 5, 5), "float32", False),
    ((4, 16, 5, 5), "float32", True),
    ((4, 16, 5, 5), "float64", False),
    ((64, 16, 33, 33), "float32", False),
    ((64, 16, 33, 33), "float32", True),
    ((1024, 16), "float32", False),
]
DRY_PROBE_CASES = [((3, 16, 2, 2), "float32", True)]
# (label, training, fused with a residual and a ReLU); the dry run takes one of each flag.
PROBE_MODES = [
    ("train", True, False),
    ("train relu(bn + residual)", True, True),
    ("eval", False, False),
    ("eval relu(bn + residual)", False, True),
]
DRY_PROBE_MODES = [PROBE_MODES[0], PROBE_MODES[3]]


def _probe_inputs(shape: tuple[int, ...], dtype: str, channels_last: bool) -> dict[str, Any]:
    """Finite inputs with each channel's scenario written in."""
    import numpy as np

    from tools.bench.cases import Case

    case = Case(shape, dtype, channels_last)
    rng = np.random.default_rng(7)
    n_channels = shape[1]
    inputs = {
        "x": case.make(1),
        "dy": case.make(2),
        "z": case.make(3),
        "weight": rng.uniform(0.5, 1.5, n_channels).astype(dtype),
        "bias": rng.uniform(-0.5, 0.5, n_channels).astype(dtype),
        "running_mean": rng.uniform(-1.0, 1.0, n_channels).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, n_channels).astype(dtype),
    }
    spatial = shape[2:]
    where = {
        "first": (0, *(0 for _ in spatial)),
        "middle": (shape[0] // 2, *(size // 2 for size in spatial)),
        "last": (shape[0] - 1, *(size - 1 for size in spatial)),
    }
    for channel, (_, entries) in enumerate(PROBE_SCENARIOS):
        for name, position, value in entries:
            if position:
                sample, *rest = where[position]
                index = (sample, channel, *rest)
                inputs[name][index] = value
            else:
                inputs[name][channel] = value
    return inputs


def _probe_passes(
    inputs: dict[str, Any],
    modes: list[tuple[str, bool, bool]],
    put: Callable[[Any], Any],
    get: Callable[[Any], Any],
) -> dict[str, Any]:
    """Every output of the forward and backward of each mode, as host arrays."""
    from numbabn import functional as F

    x, dy, z = put(inputs["x"]), put(inputs["dy"]), put(inputs["z"])
    weight, bias = put(inputs["weight"]), put(inputs["bias"])
    results: dict[str, Any] = {}
    for label, training, fused in modes:
        running_mean, running_var = put(inputs["running_mean"]), put(inputs["running_var"])
        epilogue: dict[str, Any] = {"residual": z, "activation": "relu"} if fused else {}
        y, saved = F.batch_norm_forward(
            x, running_mean, running_var, weight, bias, training, **epilogue
        )
        extra = {"bias": bias, **epilogue} if fused else {}
        grads = F.batch_norm_backward(dy, x, saved, weight, **extra)
        outputs = {"y": y, "saved mean": saved.mean, "saved invstd": saved.invstd}
        if training:
            outputs |= {"running_mean": running_mean, "running_var": running_var}
        outputs |= dict(zip(("dx", "dweight", "dbias", "dresidual"), grads, strict=False))
        results |= {f"{label}: {name}": get(value) for name, value in outputs.items()}
    return results


def _describe(values: Any) -> str:
    """The non-finite pattern of one channel's values (the value itself if there is one)."""
    import numpy as np

    if values.size == 1:
        return f"{values.reshape(-1)[0]:.6g}"
    counts = {
        "NaN": int(np.isnan(values).sum()),
        "+inf": int(np.isposinf(values).sum()),
        "-inf": int(np.isneginf(values).sum()),
    }
    counts["finite"] = values.size - sum(counts.values())
    return ", ".join(f"{kind} {count}" for kind, count in counts.items() if count)


def _differing_channels(cpu: Any, gpu: Any) -> list[int]:
    """Channels whose NaN, +inf and -inf positions or finite values differ."""
    import numpy as np

    tolerance = 1e-4 if cpu.dtype == np.float32 else 1e-9
    axis = 1 if cpu.ndim > 1 else 0
    differing = []
    for channel in range(cpu.shape[axis]):
        a, b = np.take(cpu, channel, axis=axis), np.take(gpu, channel, axis=axis)
        same = all(
            np.array_equal(test(a), test(b)) for test in (np.isnan, np.isposinf, np.isneginf)
        )
        finite = np.isfinite(a) & np.isfinite(b)
        if not same or not np.allclose(a[finite], b[finite], rtol=tolerance, atol=tolerance):
            differing.append(channel)
    return differing


def step_nan_probe(context: Context) -> Outcome:
    """NaN and +-inf in every input, GPU outputs against the CPU backend's."""
    import warnings

    import numpy as np

    from numbabn._cuda import arrays

    cases, modes = (
        (DRY_PROBE_CASES, DRY_PROBE_MODES) if context.dry_run else (PROBE_CASES, PROBE_MODES)
    )
    rows, compared, ran = [], 0, 0
    for shape, dtype, channels_last in cases:
        if ran and context.seconds_left() < 5:
            break
        name = "x".join(map(str, shape)) + f" {dtype}" + (" CL" if channels_last else "")
        print(f"probe {name}", flush=True)
        inputs = _probe_inputs(shape, dtype, channels_last)
        ran += 1
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                # The simulator runs the kernels on NumPy scalars, which warn on inf - inf.
                warnings.simplefilter("ignore", RuntimeWarning)
                on_cpu = _probe_passes(inputs, modes, lambda a: np.array(a, order="K"), np.asarray)
                on_gpu = _probe_passes(inputs, modes, arrays.to_device, arrays.to_host)
        except Exception as error:  # reported with the differences; the other cases still run
            traceback.print_exc()
            rows.append((name, "(raised)", "", "", f"{type(error).__name__}: {error}"[:200]))
            continue
        for output, cpu in on_cpu.items():
            if cpu is None:
                continue
            gpu = on_gpu[output]
            compared += 1
            for channel in _differing_channels(cpu, gpu):
                axis = 1 if cpu.ndim > 1 else 0
                rows.append((
                    name, output, f"{channel}: {PROBE_SCENARIOS[channel][0]}",
                    _describe(np.take(cpu, channel, axis=axis)),
                    _describe(np.take(gpu, channel, axis=axis)),
                ))  # fmt: skip
    scenarios = _table(
        ("channel", "scenario"), [(c, label) for c, (label, _) in enumerate(PROBE_SCENARIOS)]
    )
    markdown = [
        "Each channel holds one scenario (channels are independent; the last stays finite). "
        f"Every output of the forward and backward passes ({', '.join(m[0] for m in modes)}) "
        "is compared per channel: NaN, +inf and -inf positions, and finite values to 1e-4 "
        "(float32) or 1e-9 (float64).",
        scenarios,
    ]
    partial = (
        f" ({ran} of {len(cases)} cases before the budget ran out)" if ran < len(cases) else ""
    )
    if rows:
        markdown.append(_table(("case", "output", "channel", "CPU", "GPU"), rows))
        differing = len({(case, output) for case, output, *_ in rows})
        note = f"{differing} outputs differ from the CPU backend ({compared} compared){partial}"
        return Outcome("failed", note, "\n\n".join(markdown))
    markdown.append(f"All {compared} outputs match the CPU backend in every channel.")
    note = f"{compared} outputs of {_counted(ran, 'case')} match the CPU backend{partial}"
    return Outcome("passed", note, "\n\n".join(markdown))


# -- every pass once, plainly and under compute-sanitizer ------------------------------

# On tiny data in the dry run, and one layout: the simulator takes a second per launch.
DRY_KERNEL_ARGUMENTS = ["--shape", "2,3,2,2", "--layout", "channels-last"]


REPEATS = 1000
DRY_REPEATS = 3
# The merge protocol is one for every family: the repeats run two layouts (two merge layouts
# of partials), the sanitizers every one of kernel_calls.LAYOUTS.
REPEAT_LAYOUTS = ("nchw", "channels-last")


def _kernel_calls_command(context: Context) -> list[str]:
    command = [sys.executable, "-m", "tools.bench.kernel_calls"]
    return command + (DRY_KERNEL_ARGUMENTS if context.dry_run else [])


def step_repeat(context: Context) -> Outcome:
    """Every pass REPEATS times in a row: each run's results with the first run's bits."""
    repeats = DRY_REPEATS if context.dry_run else REPEATS
    command = [*_kernel_calls_command(context), "--repeat", str(repeats)]
    if not context.dry_run:
        command += ["--layout", ",".join(REPEAT_LAYOUTS)]
    finished = run_command(command, context.seconds_left(), _print_indented, _child_environment())
    lines = [line for line in finished.output.splitlines() if line.startswith(REPEAT_LAYOUTS)]
    markdown = f"Each pass {repeats} times in a row (`kernel_calls --repeat {repeats}`):\n\n"
    markdown += _code_block("\n".join(lines) or "(no pass ran)")
    ran = _passes_ran(finished.output)
    if finished.timed_out:
        return Outcome("failed", f"stopped at its time budget after {ran} passes", markdown)
    if finished.returncode != 0:
        found = [line for line in lines if not line.endswith(": ok")]
        return Outcome("failed", "; ".join(found)[:300] or _last_line(finished.output), markdown)
    return Outcome("passed", f"{ran} passes, {repeats} runs each, identical bits", markdown)


def _passes_ran(output: str) -> int:
    return sum(line.endswith(": ok") for line in output.splitlines())


def step_kernels(context: Context) -> Outcome:
    """Every pass once on small data (the sanitizer's workload, without it)."""
    command = _kernel_calls_command(context)
    finished = run_command(command, context.seconds_left(), _print_indented, _child_environment())
    ran = _passes_ran(finished.output)
    if finished.returncode != 0:
        return Outcome("failed", f"after {ran} passes: {_last_line(finished.output)}")
    return Outcome("passed", f"{ran} passes ran")


def find_sanitizer() -> str | None:
    """The ``compute-sanitizer`` binary: on PATH, under CUDA_HOME, or in a CUDA toolkit."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [Path(os.environ["CUDA_HOME"])] if os.environ.get("CUDA_HOME") else []
    homes += sorted(Path("/usr/local").glob("cuda*"), reverse=True)
    for home in homes:
        candidate = home / "bin" / "compute-sanitizer"
        if candidate.is_file():
            return str(candidate)
    return None


def _sanitizer_step(tool: str) -> Callable[[Context], Outcome]:
    def run(context: Context) -> Outcome:
        if context.dry_run:
            return Outcome("skipped", "needs a GPU: compute-sanitizer runs on the hardware")
        sanitizer = find_sanitizer()
        if sanitizer is None:
            return Outcome("skipped", "compute-sanitizer is not on PATH nor in a CUDA toolkit")
        command = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "40"]
        command += _kernel_calls_command(context)
        finished = run_command(
            command, context.seconds_left(), _print_indented, _child_environment()
        )
        reports = [line for line in finished.output.splitlines() if line.startswith("=====")]
        summaries = [line.strip("= ") for line in reports if "SUMMARY" in line]
        markdown = f"`compute-sanitizer --tool {tool} ... python -m tools.bench.kernel_calls`\n\n"
        markdown += _code_block("\n".join(reports[:80]) or "(no report)")
        ran = _passes_ran(finished.output)
        if finished.timed_out:
            return Outcome("failed", f"stopped at its time budget after {ran} passes", markdown)
        if finished.returncode != 0:
            found = "; ".join(summaries) or _last_line(finished.output)
            return Outcome("failed", f"exit status {finished.returncode}: {found}", markdown)
        return Outcome("passed", f"{ran} passes: " + ("; ".join(summaries) or "clean"), markdown)

    return run


# -- SyncBatchNorm on CUDA arrays under MPI --------------------------------------------

# The workload checks every rank's outputs, gradients and running statistics against
# BatchNorm on the CPU over the concatenated batch, and prints SYNC_OK on rank 0.
SYNC_WORKLOAD = "tests/mpi/sync_workload.py"
SYNC_RANKS = 2
SYNC_DEVICES = ("cuda", "cpu")  # the GPU first: the CPU run tells a GPU fault from another


def _sync_ok(device: str) -> str:
    return f"sync ok on {SYNC_RANKS} ranks ({device})"


def find_mpiexec() -> str | None:
    """``mpiexec`` beside this Python (MPICH from PyPI), or on PATH."""
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def sync_command(mpiexec: str, device: str, dry_run: bool) -> list[str]:
    """``mpiexec`` running the workload on ``device`` through :func:`sync_rank`."""
    command = [mpiexec, "-n", str(SYNC_RANKS), sys.executable, "-m", "tools.bench.gpu_check"]
    return command + ["--sync-rank", device] + (["--dry-run"] if dry_run else [])


def sync_rank(device: str, dry_run: bool) -> None:
    """One rank of the workload. In the dry run the simulator takes the small blocks of the
    tests (tests/conftest.py's ``cuda_small_blocks``): at 256 threads a block it simulates
    a thread each, minutes for the workload."""
    import runpy

    if dry_run:
        from numbabn._cuda import kernels

        kernels.THREADS, kernels.CHANNELS_PER_BLOCK = 16, 4
    workload = str(ROOT / SYNC_WORKLOAD)
    sys.argv = [workload, "--device", device]
    runpy.run_path(workload, run_name="__main__")


def step_sync_batchnorm(context: Context) -> Outcome:
    """SyncBatchNorm under ``mpiexec -n 2`` on CUDA arrays, then on host arrays."""
    if importlib.util.find_spec("mpi4py") is None:
        return Outcome("skipped", "mpi4py is not installed")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        return Outcome("skipped", "mpiexec is not beside this Python nor on PATH")
    if not (ROOT / SYNC_WORKLOAD).is_file():
        return Outcome("skipped", "the tests are not beside these tools")
    environment = _child_environment(
        NUMBA_NUM_THREADS="1", NUMBA_ENABLE_CUDASIM="1" if context.dry_run else "0"
    )
    rows, failed = [], []
    for device in SYNC_DEVICES:
        if context.seconds_left() < 3:
            rows.append((device, "not run", "", "no time left"))
            failed.append(f"{device}: no time left")
            continue
        print(f"sync-batchnorm on {device}", flush=True)
        start = time.time()
        finished = run_command(
            sync_command(mpiexec, device, context.dry_run), context.seconds_left(),
            _print_indented, environment, ROOT, own_group=True,
        )  # fmt: skip
        seconds = f"{time.time() - start:.1f}"
        if finished.returncode == 0 and _sync_ok(device) in finished.output:
            rows.append((device, "passed", seconds, _sync_ok(device)))
            continue
        why = "stopped at its time budget" if finished.timed_out else _last_line(finished.output)
        rows.append((device, "failed", seconds, why[:200].replace("|", "/")))
        failed.append(f"{device}: {why[:150]}")
    shown = shlex.join(["mpiexec", "-n", str(SYNC_RANKS), "python", SYNC_WORKLOAD, "--device", "D"])
    markdown = (
        f"`{shown}`, D = {' then '.join(SYNC_DEVICES)}: each rank's output, input gradient, "
        "running statistics and (summed over ranks) parameter gradients against BatchNorm on "
        "the CPU over the concatenated uneven batches, three steps, eval, and a channel "
        "mismatch that must fail on every rank.\n\n"
        + _table(("arrays", "status", "seconds", "note"), rows)
    )
    if failed:
        return Outcome("failed", "; ".join(failed), markdown)
    note = f"{SYNC_RANKS} ranks, CUDA and host arrays agree with BatchNorm on the CPU"
    return Outcome("passed", note + (" (simulator)" if context.dry_run else ""), markdown)


# -- speed: against PyTorch and the roofline, host time, CPU threads -------------------

# float32 ResNet-50 shapes (batch 32, and 256 for the last stage) and three of 100 MB
# or more, NCHW and channels-last; then a small one, where launches set the pace.
BENCH_CASES = [
    ((32, 64, 112, 112), False),
    ((32, 64, 112, 112), True),
    ((32, 256, 56, 56), False),
    ((32, 256, 56, 56), True),
    ((256, 2048, 7, 7), False),
    ((32, 64, 56, 56), False),
    ((32, 64, 56, 56), True),
    ((32, 512, 28, 28), False),
    ((32, 1024, 14, 14), False),
    ((32, 2048, 7, 7), False),
    ((2, 16, 8, 8), False),
]
BENCH_REPEAT = 9
# The dry run: the code paths on one launch-cheap case, not a measurement.
DRY_BENCH_CASES = [((2, 1, 2, 2), False)]
HOST_CASES = [((2, 16, 8, 8), False), ((2, 16, 8, 8), True)]
HOST_CALLS = 2000
DRY_HOST_CASES = [((2, 1, 2, 2), False)]
DRY_HOST_CALLS = 1


def _torch_cuda(context: Context) -> Any | None:
    """PyTorch, if it is there and sees the GPU (never in the dry run)."""
    if context.dry_run:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def step_benchmark(context: Context) -> Outcome:
    """numbabn beside PyTorch's CUDA batch norm and a streaming roofline (CUDA events)."""
    from tools.bench import gpu
    from tools.bench.cases import Case

    torch = _torch_cuda(context)
    specs = DRY_BENCH_CASES if context.dry_run else BENCH_CASES
    results: list[dict[str, Any]] = []
    for shape, channels_last in specs:
        if results and context.seconds_left() < 10:
            break
        case = Case(shape, channels_last=channels_last)
        print(f"benchmark {case.name}", flush=True)
        results.append(gpu.measure_gpu_case(case, 1 if context.dry_run else BENCH_REPEAT, torch))
    peer = "no PyTorch CUDA" if torch is None else f"PyTorch {torch.__version__}"
    if torch is not None:
        peer += f", cuDNN {torch.backends.cudnn.version()}"
    header = f"GPU: {gpu.gpu_name()}; {peer}."
    (context.out / "benchmark.json").write_text(json.dumps({"header": header, "results": results}))
    markdown = gpu.gpu_markdown(results, header)
    ran = _counted(len(specs), "case")
    if len(results) < len(specs):
        ran = f"{len(results)} of {ran} before the budget ran out"
    if context.dry_run:
        return Outcome(
            "passed", f"simulator, {ran}: not a measurement; cuDNN needs a GPU", markdown
        )
    if torch is None:
        return Outcome("passed", f"{ran}; no PyTorch CUDA to compare with", markdown)
    return Outcome("passed", ran, markdown)


HOST_COLUMNS = (
    "numbabn", "numbabn out=", "numbabn training step", "numbabn, PyTorch tensor in", "PyTorch"
)  # fmt: skip
# The host time per small training step (forward and backward) that numbabn aims at.
STEP_TARGET_SECONDS = 20e-6


def _host_times(
    shape: tuple[int, ...], channels_last: bool, calls: int, torch: Any | None
) -> dict[str, float]:
    """Host seconds per training forward (and per training step: forward and backward) of
    one small case, by ``HOST_COLUMNS``."""
    import numbabn
    from numbabn._cuda import arrays
    from tools.bench import gpu
    from tools.bench.cases import Case

    case = Case(shape, channels_last=channels_last)
    x, dy = arrays.to_device(case.make(0)), arrays.to_device(case.make(1))
    out = arrays.empty_like(x)
    bn = numbabn.BatchNorm2d(shape[1], device="cuda")
    times = {
        "numbabn": gpu.host_call_seconds(lambda: bn(x), calls),
        "numbabn out=": gpu.host_call_seconds(lambda: bn(x, out=out), calls),
        "numbabn training step": gpu.host_call_seconds(lambda: (bn(x), bn.backward(dy)), calls),
    }
    if torch is not None:
        peer = gpu.TorchCuda(torch, case)
        tensor = peer.x.detach()
        times["numbabn, PyTorch tensor in"] = gpu.host_call_seconds(lambda: bn(tensor), calls)
        with torch.no_grad():
            times["PyTorch"] = gpu.host_call_seconds(peer.forward, calls)
    return times


def step_host_time(context: Context) -> Outcome:
    """Host microseconds per small training forward and step: numbabn's, and PyTorch's."""
    from tools.bench.cases import Case

    torch = _torch_cuda(context)
    specs, calls = (DRY_HOST_CASES, DRY_HOST_CALLS) if context.dry_run else (HOST_CASES, HOST_CALLS)
    rows = []
    for shape, channels_last in specs:
        name = Case(shape, channels_last=channels_last).name
        print(f"host time {name}", flush=True)
        times = _host_times(shape, channels_last, calls, torch)
        cells = (f"{times[key] * 1e6:.1f}" if key in times else "n/a" for key in HOST_COLUMNS)
        rows.append((name, *cells))
    markdown = (
        f"Median host time of one training forward over {calls} back-to-back calls, the device "
        "synchronised before and after the loop only, in microseconds (BatchNorm2d on the "
        "GPU; PyTorch's `F.batch_norm` without autograd); a training step is a forward and "
        f"a backward, {STEP_TARGET_SECONDS * 1e6:.0f} us or less the target.\n\n"
        + _table(("case", *HOST_COLUMNS), rows)
    )
    note = "; ".join(f"{row[0]}: {row[1]} us, step {row[3]} us" for row in rows)
    if context.dry_run:
        return Outcome("passed", f"simulator: not a measurement ({note})", markdown)
    return Outcome("passed", note, markdown)


THREAD_COUNTS = (1, 2, 4, 8, 16)
CPU_SHAPE = (32, 64, 56, 56)
CPU_REPEAT = 7
DRY_CPU_SHAPE = (4, 8, 16, 16)
DRY_THREAD_COUNTS = (1, 2)
WORKER_SECONDS = 60.0


def cpu_worker(library: str, threads: int, shape: tuple[int, ...], repeat: int) -> dict[str, Any]:
    """Median seconds of one CPU forward + backward of float32 ``shape`` in this process.

    numbabn's thread count comes from NUMBA_NUM_THREADS, which the caller sets
    before this process starts; PyTorch's is set here.
    """
    import numpy as np

    from tools.bench.cases import Case, module_for
    from tools.bench.timing import median_seconds

    case = Case(shape)
    x, dy = case.make(0), case.make(1)
    if library == "torch":
        from tools.bench.peers import TorchBatchNorm

        peer = TorchBatchNorm(x, threads)
        return {"seconds": median_seconds(peer.forward_backward, repeat), "threads": threads}
    import numba

    out, grad = np.empty_like(x), np.empty_like(x)
    bn = module_for(x.ndim)(shape[1], dtype=np.float32)
    seconds = median_seconds(lambda: (bn(x, out=out), bn.backward(dy, out=grad)), repeat)
    return {"seconds": seconds, "threads": numba.get_num_threads()}


def _worker_result(
    library: str, threads: int, shape: tuple[int, ...], repeat: int, timeout: float
) -> dict[str, Any] | str:
    """What :func:`cpu_worker` measured in a fresh process, or why it did not."""
    environment = _child_environment(
        NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )
    command = [sys.executable, "-m", "tools.bench.gpu_check", "--cpu-worker", library]
    command += ["--threads", str(threads), "--shape", ",".join(map(str, shape))]
    command += ["--repeat", str(repeat)]
    finished = run_command(command, timeout, _print_indented, environment)
    for line in reversed(finished.output.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    return "timed out" if finished.timed_out else _last_line(finished.output)[:200]


def step_cpu_threads(context: Context) -> Outcome:
    """numbabn's and PyTorch's CPU forward + backward with 1 to 16 threads, fresh processes."""
    cores = _cores()
    wanted = DRY_THREAD_COUNTS if context.dry_run else THREAD_COUNTS
    counts = tuple(n for n in wanted if n <= cores) or (1,)
    shape = DRY_CPU_SHAPE if context.dry_run else CPU_SHAPE
    repeat = 2 if context.dry_run else CPU_REPEAT
    libraries = ["numbabn"]
    if importlib.util.find_spec("torch") is not None:
        libraries.append("torch")
    seconds: dict[tuple[str, int], float] = {}
    failures = []
    for threads in counts:
        for library in libraries:
            if context.seconds_left() < 3:
                failures.append(f"{library} x{threads}: no time left")
                continue
            print(f"cpu {library}, {threads} threads", flush=True)
            timeout = min(WORKER_SECONDS, context.seconds_left())
            result = _worker_result(library, threads, shape, repeat, timeout)
            if isinstance(result, str):
                failures.append(f"{library} x{threads}: {result}")
            elif library == "numbabn" and result["threads"] != threads:
                failures.append(f"numbabn x{threads} ran {result['threads']} threads")
            else:
                seconds[library, threads] = result["seconds"]

    def cell(library: str, threads: int) -> tuple[str, str]:
        value, base = seconds.get((library, threads)), seconds.get((library, counts[0]))
        if value is None:
            return "n/a", "n/a"
        return f"{value * 1e3:.2f}", "n/a" if base is None else f"{base / value:.2f}"

    rows = []
    for threads in counts:
        mine, theirs = cell("numbabn", threads), cell("torch", threads)
        ratio = "n/a"
        if ("numbabn", threads) in seconds and ("torch", threads) in seconds:
            ratio = f"{seconds['torch', threads] / seconds['numbabn', threads]:.2f}"
        rows.append((threads, *mine, *theirs, ratio))
    header = (
        "threads", "numbabn ms", "speed-up", "PyTorch ms", "speed-up", "× PyTorch"
    )  # fmt: skip
    markdown = (
        f"CPU training forward + backward of float32 {shape} on this machine ({cores} cores): "
        "each cell is a fresh process with that many threads (NUMBA_NUM_THREADS for numbabn, "
        "with `out=`; `torch.set_num_threads` for PyTorch); medians of "
        f"{repeat} samples. `speed-up` is over one thread; `× PyTorch` is how many "
        "times faster numbabn is.\n\n" + _table(header, rows)
    )
    if failures:
        return Outcome("failed", "; ".join(failures), markdown)
    best = min(counts, key=lambda n: seconds["numbabn", n])
    note = f"threads {', '.join(map(str, counts))}; numbabn fastest with {best}"
    return Outcome("passed", note, markdown)


# -- the run ---------------------------------------------------------------------------

# Budgets in seconds, 450 in all. A step may also use what the steps before it left
# unused (each must end by the sum of the budgets so far). The test steps compile most
# kernel variants into Numba's cache (seconds each, the first time), which the later
# steps then load.
STEPS = [
    Step("versions", "Versions", 15, step_versions),
    Step("tests-cuda", "CUDA tests on the GPU", 126, _tests_step("tests-cuda")),
    Step("tests-semantic", "Semantic tests, CUDA cases", 60, _tests_step("tests-semantic")),
    Step("nan-probe", "NaN and infinities: GPU against CPU", 25, step_nan_probe),
    Step("kernels", "Every pass once", 25, step_kernels),
    Step("racecheck", "compute-sanitizer racecheck", 50, _sanitizer_step("racecheck")),
    Step("memcheck", "compute-sanitizer memcheck", 40, _sanitizer_step("memcheck")),
    Step("repeat", "1,000 identical launches: identical bits", 15, step_repeat),
    Step("sync-batchnorm", "SyncBatchNorm on CUDA arrays, 2 MPI ranks", 30, step_sync_batchnorm),
    Step("benchmark", "Against PyTorch (cuDNN) and the roofline", 35, step_benchmark),
    Step("host-time", "Host time per small forward and training step", 14, step_host_time),
    Step("cpu-threads", "CPU thread scaling", 15, step_cpu_threads),
]
STEP_NAMES = [step.name for step in STEPS]


class Log:
    """Prints each line and appends it to the log file."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class Row:
    """One step's line of the summary."""

    step: Step
    outcome: Outcome
    seconds: float


def _run_step_process(step: Step, out: Path, dry_run: bool, deadline: float, log: Log) -> Outcome:
    """Run one step in a process of its own, stopped at ``deadline``, and read its outcome."""
    result = out / STEP_RESULTS / f"{step.name}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "tools.bench.gpu_check", "--step", step.name]
    command += ["--out", str(out), "--deadline", repr(deadline)] + (
        ["--dry-run"] if dry_run else []
    )
    environment = _child_environment(NUMBA_ENABLE_CUDASIM="1" if dry_run else "0")
    finished = run_command(
        command, deadline - time.time(), lambda line: log("    " + line), environment,
        own_group=True,
    )  # fmt: skip
    if result.exists():
        outcome = Outcome(**json.loads(result.read_text()))
        if outcome.status in STATUSES:
            return outcome
    if finished.timed_out:
        return Outcome("failed", f"stopped at its time budget ({step.budget:.0f} s)")
    return Outcome(
        "failed", f"exit status {finished.returncode}: {_last_line(finished.output)[:300]}"
    )


def _summary_table(rows: list[Row]) -> str:
    return _table(
        ("step", "status", "seconds", "budget", "note"),
        (
            (row.step.name, row.outcome.status, f"{row.seconds:.1f}", f"{row.step.budget:.0f}",
             row.outcome.note.replace("|", "/"))
            for row in rows
        ),
    )  # fmt: skip


def write_reports(
    out: Path, rows: list[Row], started: datetime.datetime, seconds: float, dry_run: bool
) -> None:
    """The summary of the steps, and the report with every table."""
    if dry_run:
        line = "The dry run of `make gpu-check` in Numba's CUDA simulator (tiny shapes; no time "
        line += "is a measurement)"
    else:
        line = "Written by `make gpu-check` (`python -m tools.bench.gpu_check`)"
    line += f", started {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all."
    gpu = next((row.outcome.note for row in rows if row.step.name == "versions"), "")
    if gpu and not dry_run:
        line += f" GPU: {gpu}."
    table = _summary_table(rows)
    (out / SUMMARY).write_text(f"# numbabn GPU check: summary\n\n{line}\n\n{table}\n")
    sections = ["# numbabn on the GPU", line, "## Summary", table]
    for row in rows:
        sections.append(f"## {row.step.title}")
        sections.append(
            f"_{row.outcome.status}_" + (f": {row.outcome.note}" if row.outcome.note else "")
        )
        if row.outcome.markdown:
            sections.append(row.outcome.markdown)
    (out / REPORT).write_text("\n\n".join(sections) + "\n")


def run_all(out: Path, dry_run: bool, names: list[str]) -> int:
    """Run the steps ``names`` in order; returns 1 if one of them failed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / STEP_RESULTS).mkdir(exist_ok=True)
    (out / LOG).unlink(missing_ok=True)
    log = Log(out / LOG)
    steps = [step for step in STEPS if step.name in names]
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.time()
    mode = "dry run in the CUDA simulator" if dry_run else "GPU"
    total = sum(step.budget for step in steps)
    log(
        f"numbabn GPU check ({mode}): {len(steps)} steps in at most {total:.0f} s, results in {out}"
    )
    rows = []
    deadline = start
    stopped = ""
    for index, step in enumerate(steps, 1):
        deadline += step.budget
        if stopped:
            rows.append(Row(step, Outcome("skipped", stopped), 0.0))
            continue
        step_start = time.time()
        where = f"at {step_start - start:.0f} s, until {deadline - start:.0f} s"
        log(f"[{index}/{len(steps)}] {step.name}: {step.title} ({where})")
        outcome = _run_step_process(step, out, dry_run, deadline, log)
        rows.append(Row(step, outcome, time.time() - step_start))
        log(
            f"[{index}/{len(steps)}] {step.name}: {outcome.status} in {rows[-1].seconds:.1f} s"
            + (f" ({outcome.note})" if outcome.note else "")
        )
        if step.name == "versions" and outcome.status == "failed":
            stopped = f"not run: the versions step failed ({outcome.note})"
    seconds = time.time() - start
    write_reports(out, rows, started, seconds, dry_run)
    shutil.rmtree(out / STEP_RESULTS, ignore_errors=True)  # their content is in the reports
    counts = Counter(row.outcome.status for row in rows)
    log(
        f"done in {seconds:.0f} s: "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
        + f"; see {out / SUMMARY} and {out / REPORT}"
    )
    log.close()
    print("\n" + (out / SUMMARY).read_text(), end="", flush=True)
    return 1 if counts["failed"] else 0


def _run_step_here(name: str, out: Path, dry_run: bool, deadline: float) -> int:
    step = STEPS[STEP_NAMES.index(name)]
    try:
        outcome = step.run(Context(out, dry_run, deadline))
    except Exception:
        traceback.print_exc()
        outcome = Outcome("failed", _last_line(traceback.format_exc())[:300])
    (out / STEP_RESULTS / f"{name}.json").write_text(json.dumps(asdict(outcome)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.gpu_check",
        description="Every GPU check in one run of under 8 minutes: versions, the CUDA tests, a "
        "NaN probe, compute-sanitizer, SyncBatchNorm under MPI, a benchmark and CPU thread "
        "scaling.",
    )
    parser.add_argument("--out", type=Path, help="directory for the log, summary, report, XML")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes in the simulator")
    parser.add_argument(
        "--steps", default=",".join(STEP_NAMES), help="comma-separated steps (default: all)"
    )
    # One step, or one CPU timing, in a process of its own (the run starts these).
    parser.add_argument("--step", choices=STEP_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-worker", choices=("numbabn", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--sync-rank", choices=SYNC_DEVICES, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sync_rank:
        sync_rank(args.sync_rank, args.dry_run)
        return 0
    if args.cpu_worker:
        shape = tuple(int(size) for size in args.shape.split(","))
        result = cpu_worker(args.cpu_worker, args.threads, shape, args.repeat)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    out = args.out.resolve()  # the test steps run pytest in the repository's root
    if args.step:
        return _run_step_here(args.step, out, args.dry_run, args.deadline)
    names = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STEP_NAMES))
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)}; the steps are {', '.join(STEP_NAMES)}")
    return run_all(out, args.dry_run, names)


if __name__ == "__main__":
    sys.exit(main())
