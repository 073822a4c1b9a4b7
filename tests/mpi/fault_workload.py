"""Run under ``mpiexec -n 3``: SyncBatchNorm when one rank misbehaves.

``python fault_workload.py SCENARIO [SCENARIO ...]`` runs the scenarios in the
order given, each on fresh modules. Rank 2 (or rank 1) is the odd one out. Every
rank prints one line per scenario::

    rank 1: forward_channels: _RankFailed: SyncBatchNorm failed on another rank (...)
    rank 2: forward_channels: RuntimeError: running_mean should contain 4 elements not 3

that is, the error the rank raised, or ``ok ...`` when it raised nothing and its
results were checked. A line ends in ``| state kept`` when the failed call left
the module's state as it was, and in ``| recovered`` when a correct step on every
rank afterwards worked and gave every rank the same running statistics. Checks
that fail print ``FAIL: ...``.

Modules get a short exchange timeout so that a rank left waiting raises
instead of hanging. After ``eval_mixed`` the communicator is out of step, so it
must be the last scenario of a launch.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
from mpi4py import MPI

import numbabn as nbn
from numbabn._cpu.backend import CpuBackend

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# The workload's own synchronisation, apart from the exchanges under test: after
# a timeout, COMM_WORLD has an unfinished collective that any other would pair with.
coordination = comm.Dup()
ODD = size - 1  # the rank that misbehaves
CHANNELS = 4
TIMEOUT = 120.0  # seconds: far above a healthy exchange (kernels may compile first)
EVAL_TIMEOUT = 3.0  # eval_mixed waits for a rank that never comes


class InjectedFault(Exception):
    """An unexpected failure inside a kernel call (not one of the usual error types)."""


def batches(seed: int, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, slice]:
    """The whole batch, its gradient and this rank's slice of both (3 samples a rank)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3 * size, CHANNELS, 3, 5)) * 2.0 + 5.0).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    return x, dy, slice(3 * rank, 3 * rank + 3)


def make(channels: int = CHANNELS, dtype: Any = np.float64, **kwargs: Any) -> nbn.SyncBatchNorm:
    module = nbn.SyncBatchNorm(channels, dtype=dtype, timeout=TIMEOUT, **kwargs)
    module.weight[...] = np.linspace(0.5, 2.0, channels)
    module.bias[...] = np.linspace(-1.0, 1.0, channels)
    return module


def state(module: nbn.SyncBatchNorm) -> dict[str, Any]:
    """Everything a failed call must leave alone."""
    grads = {name: None if grad is None else grad.copy() for name, grad in module.grads.items()}
    return {
        "state_dict": {key: value.copy() for key, value in module.state_dict().items()},
        "grads": grads,
        "saved": module._saved,
        "training": module.training,
    }


def same_state(before: dict[str, Any], after: dict[str, Any]) -> bool:
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return (
                isinstance(a, np.ndarray)
                and isinstance(b, np.ndarray)
                and a.dtype == b.dtype
                and a.tobytes() == b.tobytes()
            )
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, tuple):  # what the last forward saved: the very same object
            return a is b
        return a == b

    return same(before, after)


@contextmanager
def fault_on(rank_with_fault: int, method: str) -> Iterator[None]:
    """Make ``CpuBackend.<method>`` raise :class:`InjectedFault` on one rank."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise InjectedFault(f"{method} failed")

    if rank != rank_with_fault:
        yield
        return
    with mock.patch.object(CpuBackend, method, staticmethod(boom)):
        yield


def outcome(call: Callable[[], Any]) -> tuple[str, bool]:
    """Run ``call``: ``("ok", False)`` or ``("<ErrorName>: <message>", True)``."""
    try:
        call()
    except Exception as error:  # every kind: the test reads what each rank raised
        return f"{type(error).__name__}: {error}", True
    return "ok", False


def recover(module: nbn.SyncBatchNorm, seed: int) -> str:
    """A correct step on every rank; the running statistics must agree everywhere."""
    x, dy, mine = batches(seed, module.dtype)
    module.train()
    module(x[mine])
    module.backward(dy[mine])
    states = comm.allgather(module.running_var.tobytes() + module.running_mean.tobytes())
    return "recovered" if all(item == states[0] for item in states) else "FAIL: not recovered"


def failed_call(module: nbn.SyncBatchNorm, call: Callable[[], Any], seed: int | None) -> str:
    """The outcome of ``call`` (meant to raise), whether it kept the state, then recovery.

    ``seed`` seeds the recovery step's data; None skips it (for modules that
    differ between ranks, which cannot recover).
    """
    before = state(module)
    text, raised = outcome(call)
    if not raised:
        return f"FAIL: no error ({text})"
    kept = "state kept" if same_state(before, state(module)) else "FAIL: state changed"
    return f"{text} | {kept}" + ("" if seed is None else f" | {recover(module, seed)}")


# -- scenarios ---------------------------------------------------------------------------


def forward_channels() -> str:
    """The odd rank passes 3 channels to a 4-channel module."""
    module = make()
    x, _, mine = batches(1)
    mine_x = x[mine][:, :3] if rank == ODD else x[mine]
    return failed_call(module, lambda: module(mine_x), 11)


def forward_dtype() -> str:
    """The odd rank passes float32 input to a float64 module."""
    module = make()
    x, _, mine = batches(2)
    mine_x = x[mine].astype(np.float32) if rank == ODD else x[mine]
    return failed_call(module, lambda: module(mine_x), 12)


def forward_raises() -> str:
    """The odd rank's statistics kernel raises an unexpected exception mid-forward."""
    module = make()
    x, dy, mine = batches(3)
    module(x[mine])  # a good step first, so there is state to keep
    module.backward(dy[mine])

    def call() -> None:
        with fault_on(ODD, "moments"):
            module(x[mine] * 2)

    return failed_call(module, call, 13)


def module_channels() -> str:
    """The odd rank's module and input have 3 channels, the others' 4."""
    channels = 3 if rank == ODD else CHANNELS
    module = make(channels)
    x, _, mine = batches(4)
    return failed_call(module, lambda: module(x[mine][:, :channels]), None)


def module_dtype() -> str:
    """The odd rank's module and input are float32, the others' float64."""
    dtype = np.float32 if rank == ODD else np.float64
    module = make(dtype=dtype)
    x, _, mine = batches(5, dtype)
    return failed_call(module, lambda: module(x[mine]), None)


def backward_shape() -> str:
    """The odd rank passes a grad_output of the wrong shape."""
    module = make()
    x, dy, mine = batches(6)
    module(x[mine])
    mine_dy = dy[mine][:2] if rank == ODD else dy[mine]
    return failed_call(module, lambda: module.backward(mine_dy), 16)


def backward_raises() -> str:
    """The odd rank's gradient-sums kernel raises an unexpected exception mid-backward."""
    module = make()
    x, dy, mine = batches(7)
    module(x[mine])

    def call() -> None:
        with fault_on(ODD, "grad_sums"):
            module.backward(dy[mine])

    return failed_call(module, call, 17)


def backward_without_forward() -> str:
    """The others call forward and backward; the odd rank, with a new module, only backward."""
    module = make()
    x, dy, mine = batches(8)

    def call() -> None:
        if rank != ODD:
            module(x[mine])
        module.backward(dy[mine])

    return failed_call(module, call, 18)


def out_of_step() -> str:
    """After a step together, the others step again; the odd rank only repeats backward."""
    module = make()
    x, dy, mine = batches(9)
    module(x[mine])
    module.backward(dy[mine])

    def call() -> None:
        if rank != ODD:
            module(x[mine] * 3)
        module.backward(dy[mine])

    return failed_call(module, call, 19)


def failed_eval_forward() -> str:
    """After a training forward on every rank, the odd rank's eval forward fails.

    That failure must not change which backward comes next: every rank's
    backward still belongs to the training forward and exchanges.
    """
    module = make()
    x, dy, mine = batches(10)
    module(x[mine])
    noted = ""
    if rank == ODD:
        module.eval()
        text, raised = outcome(lambda: module(x[mine][:, :3]))
        module.train()
        if not raised:
            return f"FAIL: no error ({text})"
        noted = f"eval error: {text} | "
    reference = nbn.BatchNorm2d(CHANNELS, dtype=np.float64)
    reference.load_state_dict(make().state_dict())
    reference(x)
    dx = module.backward(dy[mine])
    np.testing.assert_allclose(dx, reference.backward(dy)[mine], rtol=0, atol=1e-10)
    return noted + "ok"


def nonfinite(value: float, channel: int) -> str:
    """Rank 1 has one ``value`` in ``channel``: PyTorch's result on the whole batch.

    That channel's variance is NaN, so its output, input gradient, running
    variance and weight gradient are NaN on every rank; its running mean is
    ``value`` (NaN, or +inf for +inf: the mean of the whole batch, merged from
    ranks 0 and 2 around rank 1's). Every other channel is finite and as on the
    whole batch in one process. The bias gradient (``sum(dy)``) stays finite.
    """
    module = make()
    reference = nbn.BatchNorm2d(CHANNELS, dtype=np.float64)
    reference.load_state_dict(module.state_dict())
    x, dy, mine = batches(20)
    x[4, channel, 1, 2] = value  # sample 4 belongs to rank 1
    y = module(x[mine])
    dx = module.backward(dy[mine])
    y_ref = reference(x)
    dx_ref = reference.backward(dy)
    grads = {name: comm.allreduce(module.grads[name]) for name in ("weight", "bias")}
    # name: (this rank's result, the one-process result, the channel's expected test)
    mean_test = np.isnan if np.isnan(value) else np.isposinf if value > 0 else np.isneginf
    checks = {
        "output": (y, y_ref[mine], np.isnan),
        "dx": (dx, dx_ref[mine], np.isnan),
        "running_mean": (module.running_mean, reference.running_mean, mean_test),
        "running_var": (module.running_var, reference.running_var, np.isnan),
        "grads[weight]": (grads["weight"], reference.grads["weight"], np.isnan),
        "grads[bias]": (grads["bias"], reference.grads["bias"], None),
    }
    others = np.arange(CHANNELS) != channel
    for name, (got, want, test) in checks.items():
        got_c = got[:, channel] if got.ndim > 1 else got[channel]
        want_c = want[:, channel] if want.ndim > 1 else want[channel]
        if test is not None and not test(got_c).all():
            return f"FAIL: {name} of channel {channel} is not all {test.__name__[2:]}"
        if test is not None and not test(want_c).all():  # the one-process reference agrees
            return f"FAIL: one process's {name} of channel {channel} is not all {test.__name__[2:]}"
        if test is None:
            others = slice(None)
        got_o, want_o = (
            (got[:, others], want[:, others]) if got.ndim > 1 else (got[others], want[others])
        )
        if not np.isfinite(got_o).all():
            return f"FAIL: {name} is not finite in the other channels"
        np.testing.assert_allclose(got_o, want_o, rtol=1e-9, atol=1e-9, err_msg=name)
        others = np.arange(CHANNELS) != channel
    return f"ok nan in channel {channel} only | {recover(module, 21)}"


def nan_data() -> str:
    return nonfinite(np.nan, 2)


def inf_data() -> str:
    return nonfinite(np.inf, 0)


def eval_mixed() -> str:
    """The odd rank stays in eval mode for two steps while the others train.

    Eval exchanges nothing, so the training ranks wait for a rank that never
    joins and raise ExchangeTimeout; every later exchange there raises at once.
    The eval rank's own (local) results are right; once the others have given
    up, its next training step finds no one to exchange with and times out too.
    """
    module = make()
    module.timeout = EVAL_TIMEOUT
    x, dy, mine = batches(22)
    if rank == ODD:
        module.eval()
        expected = nbn.BatchNorm2d(CHANNELS, dtype=np.float64)
        expected.load_state_dict(module.state_dict())
        expected.eval()
        for _ in range(2):
            y = module(x[mine])
            dx = module.backward(dy[mine])
            if y.tobytes() != expected(x[mine]).tobytes():
                return "FAIL: eval output differs"
            if dx.tobytes() != expected.backward(dy[mine]).tobytes():
                return "FAIL: eval dx differs"
        coordination.barrier()  # wait until the others have timed out
        module.train()
        text, _ = outcome(lambda: module(x[mine]))
        return f"eval ok | then {text}"
    before = state(module)
    text, raised = outcome(lambda: (module(x[mine]), module.backward(dy[mine])))
    coordination.barrier()
    if not raised:
        return f"FAIL: no error ({text})"
    kept = "state kept" if same_state(before, state(module)) else "FAIL: state changed"
    again, _ = outcome(lambda: module(x[mine]))
    return f"{text} | {kept} | then {again}"


def in_step() -> str:
    """A correct step after the faults: every rank agrees."""
    return "ok " + recover(make(), 30)


SCENARIOS: dict[str, Callable[[], str]] = {
    function.__name__: function
    for function in (
        forward_channels,
        forward_dtype,
        forward_raises,
        module_channels,
        module_dtype,
        backward_shape,
        backward_raises,
        backward_without_forward,
        out_of_step,
        failed_eval_forward,
        nan_data,
        inf_data,
        eval_mixed,
        in_step,
    )
}


def main(names: list[str]) -> None:
    for name in names:
        try:
            line = SCENARIOS[name]()
        except Exception:  # report on this rank and go on: the test reads every line
            line = "FAIL: " + traceback.format_exc().replace("\n", " / ")
        # One write per line, so that the ranks' lines never interleave.
        sys.stdout.write(f"rank {rank}: {name}: {line}\n")
        sys.stdout.flush()
    if "eval_mixed" in names:
        # COMM_WORLD holds unfinished exchanges, which MPI_Finalize may wait on for
        # ever: once every rank has reported, leave without it.
        coordination.barrier()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
