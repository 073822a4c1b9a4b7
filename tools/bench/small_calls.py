"""Small calls: numbabn's modules beside ``torch.nn``'s on CPU tensors, where Python sets the pace.

``python -m tools.bench.small_calls`` (``make bench-small``) times, for each case,
the training forward, forward + backward and eval forward of numbabn's module and
of PyTorch's on the same float32 data, with the same thread count (Numba's and
``torch.set_num_threads``), every timing of a case sampled in the same rounds
(:func:`~tools.bench.timing.interleaved_medians`) so that a slow spell of a shared
machine falls on both alike. The calls are the ones a training loop makes:

- numbabn: ``bn(x)`` (a new output, as PyTorch's module makes one too);
  ``bn(x); bn.backward(g)`` (a new ``dx``); and ``bn(x)`` on a module in eval mode;
- PyTorch: ``bn(x)`` under ``torch.no_grad()`` in training and in eval mode, and
  ``y = bn(x); y.backward(g)`` through autograd, ``x.grad`` reset to None before
  each call so that it gets a new tensor as numbabn's ``dx`` is.

Beside ``BatchNorm2d`` on (2, 16, 8, 8) stands the one-call floor: one serial
``@njit`` function doing that whole training forward (per-channel sums in
float64, the coefficients, the running statistics with momentum 0.1 and the
unbiased variance, the affine pass) into a preallocated output, called from
Python in the same rounds. numbabn's training forward over that time is what its
Python layer and its separate kernel calls cost beyond one compiled call.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit

import numbabn
from tools.bench import machine
from tools.bench.peers import torch_available
from tools.bench.timing import interleaved_medians

MOMENTUM = 0.1
EPS = 1e-5
PASSES = ("forward", "forward_backward", "eval")
TITLES = {"forward": "train forward", "forward_backward": "forward + backward", "eval": "eval"}


@dataclass(frozen=True)
class SmallCase:
    """A module kind (``"BatchNorm1d"`` or ``"BatchNorm2d"``) and a float32 input shape."""

    module: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.module} {'x'.join(map(str, self.shape))}"

    def make(self, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.shape, dtype=np.float32)
        x += np.arange(self.shape[1], dtype=np.float32).reshape(
            (1, -1) + (1,) * (len(self.shape) - 2)
        )
        return x


SMALL_CASES = [
    SmallCase("BatchNorm1d", (64, 32)),
    SmallCase("BatchNorm1d", (256, 128)),
    SmallCase("BatchNorm1d", (1024, 512)),
    SmallCase("BatchNorm1d", (4096, 1024)),
    SmallCase("BatchNorm1d", (32, 64, 100)),
    SmallCase("BatchNorm2d", (2, 16, 8, 8)),
    SmallCase("BatchNorm2d", (8, 32, 32, 32)),
]
# The case the one-call floor stands beside.
FLOOR_CASE = SmallCase("BatchNorm2d", (2, 16, 8, 8))


@njit(cache=True)
def train_forward_floor(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    momentum: float,
    eps: float,
    out: np.ndarray,
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
) -> None:
    """A whole training forward of ``x`` (N, C, L) into ``out``, serially, in one call.

    Per channel: shifted sums in float64 (the shift is the channel's first value),
    the batch mean and biased variance, the saved mean and inverse standard
    deviation, the running statistics (unbiased variance), and ``x * scale + shift``.
    """
    n, channels, length = x.shape
    count = n * length
    for c in range(channels):
        origin = np.float64(x[0, c, 0])
        total = 0.0
        squares = 0.0
        for i in range(n):
            for j in range(length):
                value = np.float64(x[i, c, j]) - origin
                total += value
                squares += value * value
        shifted_mean = total / count
        var = max(squares / count - shifted_mean * shifted_mean, 0.0)
        mean = origin + shifted_mean
        invstd = 1.0 / np.sqrt(var + eps)
        save_mean[c] = mean
        save_invstd[c] = invstd
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean
        unbiased = var * count / max(count - 1, 1)
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * unbiased
        scale = np.float32(weight[c] * invstd)
        shift = np.float32(bias[c] - mean * weight[c] * invstd)
        for i in range(n):
            for j in range(length):
                out[i, c, j] = x[i, c, j] * scale + shift


class Floor:
    """The one-call floor's arrays for ``x``, and the call, as a training loop makes it."""

    def __init__(self, x: np.ndarray) -> None:
        channels = x.shape[1]
        self.x = x.reshape(x.shape[0], channels, -1)
        self.weight = np.ones(channels, np.float32)
        self.bias = np.zeros(channels, np.float32)
        self.running_mean = np.zeros(channels, np.float32)
        self.running_var = np.ones(channels, np.float32)
        self.out = np.empty_like(self.x)
        self.save_mean = np.empty(channels, np.float64)
        self.save_invstd = np.empty(channels, np.float64)

    def __call__(self) -> None:
        train_forward_floor(
            self.x, self.weight, self.bias, self.running_mean, self.running_var,
            MOMENTUM, EPS, self.out, self.save_mean, self.save_invstd,
        )  # fmt: skip


def numbabn_calls(case: SmallCase, x: np.ndarray, g: np.ndarray) -> dict[str, Callable[[], object]]:
    """numbabn's three calls of ``case``, each on a module of its own."""
    module = getattr(numbabn, case.module)
    channels = case.shape[1]
    train = module(channels, momentum=MOMENTUM, dtype=np.float32)
    train_backward = module(channels, momentum=MOMENTUM, dtype=np.float32)
    evaluate = module(channels, momentum=MOMENTUM, dtype=np.float32)
    evaluate.eval()

    def forward_backward() -> None:
        train_backward(x)
        train_backward.backward(g)

    return {
        "forward": lambda: train(x),
        "forward_backward": forward_backward,
        "eval": lambda: evaluate(x),
    }


def torch_calls(
    case: SmallCase, x: np.ndarray, g: np.ndarray, threads: int
) -> dict[str, Callable[[], object]]:
    """PyTorch's three calls of ``case`` on CPU tensors over the same data."""
    import torch

    torch.set_num_threads(threads)
    module = getattr(torch.nn, case.module)
    channels = case.shape[1]
    train = module(channels, momentum=MOMENTUM)
    train_backward = module(channels, momentum=MOMENTUM)
    evaluate = module(channels, momentum=MOMENTUM).eval()
    tensor = torch.from_numpy(x)
    leaf = torch.from_numpy(x.copy()).requires_grad_(True)
    gradient = torch.from_numpy(g)

    def forward() -> None:
        with torch.no_grad():
            train(tensor)

    def forward_backward() -> None:
        leaf.grad = None
        train_backward(leaf).backward(gradient)

    def eval_forward() -> None:
        with torch.no_grad():
            evaluate(tensor)

    return {"forward": forward, "forward_backward": forward_backward, "eval": eval_forward}


def measure_small_case(
    case: SmallCase, repeat: int, threads: int, with_torch: bool, multiply: bool = False
) -> dict[str, Any]:
    """Median seconds of each call of ``case``, numbabn's and PyTorch's sampled in turn.

    With ``multiply``, also NumPy's ``multiply(x, scale, out=y)`` into a preallocated
    array (``"multiply"``): one read and one write of the data, the least an eval does.
    """
    x = case.make(0)
    g = case.make(1)
    funcs = {f"numbabn_{key}": call for key, call in numbabn_calls(case, x, g).items()}
    if with_torch:
        funcs |= {f"torch_{key}": call for key, call in torch_calls(case, x, g, threads).items()}
    if case == FLOOR_CASE:
        funcs["floor_forward"] = Floor(x)
    if multiply:
        scale = np.ones(case.shape[1], np.float32).reshape((-1,) + (1,) * (x.ndim - 2))
        y = np.empty_like(x)
        funcs["multiply"] = lambda: np.multiply(x, scale, out=y)
    return {
        "case": case.name,
        "shape": list(case.shape),
        "seconds": interleaved_medians(funcs, repeat),
    }


def python_calls(case: SmallCase = FLOOR_CASE, warm: int = 20) -> dict[str, int]:
    """Function calls cProfile counts in one warm training forward of ``case``.

    ``all``: every call it sees, built-in functions included; ``python``: the
    calls of functions written in Python.
    """
    x = case.make(0)
    bn = getattr(numbabn, case.module)(case.shape[1], dtype=np.float32)
    for _ in range(warm):
        bn(x)
    profile = cProfile.Profile()
    profile.enable()
    bn(x)
    profile.disable()
    entries = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    counted = {"all": 0, "python": 0}
    for (filename, _, function), (_, calls, *_) in entries.items():
        if "_lsprof.Profiler" in function:
            continue  # the profiler's own disable() call, no part of the forward
        counted["all"] += calls
        if filename != "~":  # "~": a built-in function
            counted["python"] += calls
    return counted


def measure_small(
    repeat: int,
    threads: int,
    with_torch: bool,
    cases: list[SmallCase] | None = None,
    progress: bool = True,
    runs: int = 1,
    multiply: bool = False,
) -> dict[str, Any]:
    """Every small case in turn, ``runs`` times over, and the Python calls of one warm forward.

    Each run measures every case once; a case's figures are the medians over the
    runs of its medians, so that a slow spell of a shared machine during one run
    moves them less.
    """
    cases = SMALL_CASES if cases is None else cases
    measured: list[list[dict[str, float]]] = [[] for _ in cases]
    step = 0
    for run in range(1, runs + 1):
        for index, case in enumerate(cases):
            step += 1
            if progress:
                which = f", run {run} of {runs}" if runs > 1 else ""
                print(
                    f"[{step}/{runs * len(cases)}] small calls {case.name}{which}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
            measured[index].append(
                measure_small_case(case, repeat, threads, with_torch, multiply)["seconds"]
            )
    results = []
    for case, samples in zip(cases, measured, strict=True):
        seconds = {key: float(np.median([sample[key] for sample in samples])) for key in samples[0]}
        results.append({"case": case.name, "shape": list(case.shape), "seconds": seconds})
    return {
        "repeat": repeat, "runs": runs, "threads": threads, "results": results,
        "calls": python_calls(),
    }  # fmt: skip


def _us(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e6:.1f}"


def _ratio(theirs: float | None, mine: float) -> str:
    return "n/a" if theirs is None else f"{theirs / mine:.2f}"


def small_markdown(small: dict[str, Any]) -> str:
    """The small-calls table: microseconds per call, and PyTorch's time over numbabn's."""
    runs = small.get("runs", 1)
    over = f"; the median of {runs} runs of them" if runs > 1 else ""
    lines = [
        "### Small calls: numbabn's modules beside torch.nn's on CPU tensors, float32",
        "",
        "Medians in microseconds per call, numbabn's and PyTorch's sampled in the same rounds",
        f"({small['repeat']} rounds{over}), {small['threads']} threads each. `× PyTorch` is",
        "PyTorch's time over numbabn's (above 1: numbabn is faster). numbabn: `bn(x)`, which",
        "makes a new output (PyTorch's module does too); `bn(x); bn.backward(g)`, a new dx;",
        "`bn(x)` in eval mode. PyTorch: `bn(x)` under `torch.no_grad()`, and `y = bn(x);",
        "y.backward(g)` through autograd (x.grad reset to None first, so that it is a new",
        "tensor too). The floor row: one serial `@njit` function doing the whole training",
        "forward into a preallocated output, called from Python; its last cell is numbabn's",
        "train forward over the floor's time.",
        "",
        "| module | shape | train fwd | PyTorch | × PyTorch | fwd + bwd | PyTorch | × PyTorch "
        "| eval | PyTorch | × PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in small["results"]:
        seconds = result["seconds"]
        module, shape = result["case"].split(" ", 1)
        cells = []
        for key in PASSES:
            mine, theirs = seconds[f"numbabn_{key}"], seconds.get(f"torch_{key}")
            cells += [_us(mine), _us(theirs) or "n/a", _ratio(theirs, mine)]
        lines.append(f"| {module} | {shape} | " + " | ".join(cells) + " |")
        floor = seconds.get("floor_forward")
        if floor is not None:
            ratio = seconds["numbabn_forward"] / floor
            lines.append(
                f"| one-call floor | {shape} | {_us(floor)} | | numbabn / floor: {ratio:.1f} "
                "| | | | | | |"
            )
    calls = small.get("calls")
    if calls:
        lines += [
            "",
            f"One warm training forward of {FLOOR_CASE.name} makes {calls['all']} function "
            f"calls as cProfile counts them, {calls['python']} of them to Python functions.",
        ]
    return "\n".join(lines) + "\n"


def library_origin() -> str:
    """Where the numbabn under test comes from: its git commit, if it is in a checkout."""
    folder = Path(numbabn.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
            check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=folder, capture_output=True,
            text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "installed"
    return f"commit {commit}" + (" with uncommitted changes" if changed else "")


def report_header(title: str, threads: int, with_torch: bool) -> str:
    """A report's title and the machine, load, threads and versions it was measured with."""
    print(f"numbabn from {numbabn.__file__}", file=sys.stderr)
    versions = (
        f"numbabn {numbabn.__version__} ({library_origin()}), numpy {np.__version__}, "
        f"numba {numba.__version__}"
    )
    if with_torch:
        import torch

        versions += f", torch {torch.__version__}"
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f} at the start"
    return (
        f"## {title}\n\nMachine: {machine.describe()}{load}, {threads} threads "
        f"(numbabn and PyTorch alike), Python {platform.python_version()}; {versions}."
    )


def run_table(
    argv: list[str] | None,
    prog: str,
    description: str,
    title: str,
    table: Callable[[int, int, bool, int], str],
    repeat: int,
    runs: int,
) -> None:
    """A table's command line: ``table(repeat, threads, with_torch, runs)`` under a header."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--repeat", type=int, default=repeat, help="samples per median")
    parser.add_argument(
        "--runs", type=int, default=runs, help="runs of every case; each figure is their median"
    )
    parser.add_argument("--threads", type=int, default=None, help="Numba and PyTorch threads")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--output", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    with_torch = not args.no_torch and torch_available()
    header = report_header(title, threads, with_torch)
    print(header.replace("## ", ""), file=sys.stderr)
    report = header + "\n\n" + table(args.repeat, threads, with_torch, args.runs)
    print(report, end="")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        print(f"wrote {args.output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    run_table(
        argv, "python -m tools.bench.small_calls",
        "Small module calls: numbabn beside torch.nn on CPU tensors.", "numbabn small calls",
        lambda repeat, threads, with_torch, runs: small_markdown(
            measure_small(repeat, threads, with_torch, runs=runs)
        ),
        repeat=21, runs=3,
    )  # fmt: skip


if __name__ == "__main__":
    main()
