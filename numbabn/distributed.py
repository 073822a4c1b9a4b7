"""SyncBatchNorm: batch statistics over the union of all MPI ranks' batches.

Each training forward makes one exchange (the per-channel count, mean and M2)
and each backward one more (the per-channel ``sum(dy)`` and
``sum(dy * (x - mean))``). An exchange is two ``Iallgather`` calls: a small
header (whether the rank failed locally, forward or backward, channels, dtype),
then, only when every rank's header agrees, the vectors. Only per-channel
vectors cross; the data stays where it is. Gathered values are merged in rank
order, so every rank computes bit-identical statistics, run after run.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import numpy as np

from numbabn._dispatch import Backend
from numbabn._phases import BACKWARD, FORWARD, Pass
from numbabn._validation import is_bfloat16
from numbabn.epilogue import Epilogue
from numbabn.modules import _BatchNorm
from numbabn.stats import ChannelStats

__all__ = ["ExchangeTimeout", "MpiExchange", "SyncBatchNorm"]

# Exchanges wait this long for every rank by default: torch.distributed's default
# process-group timeout. A rank that never joins (one in eval mode while the
# others train, one that died) then makes the others raise instead of hanging.
DEFAULT_TIMEOUT = 1800.0

_KINDS = {int(FORWARD): "forward", int(BACKWARD): "backward"}
_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}
_BFLOAT16_CODE = 3  # ml_dtypes.bfloat16, told by name (see numbabn._validation.is_bfloat16)
_DTYPE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
_DTYPE_NAMES[_BFLOAT16_CODE] = "bfloat16"
_TEXT_BYTES = 1024  # of each failing rank's error text that the others quote

# Communicators on which an exchange timed out. Its collective is still posted,
# so a later one would be paired with it: every later exchange there raises.
_out_of_step: set[int] = set()
# Requests and buffers of the timed-out exchanges: MPI may still write into
# the buffers, so they must outlive the call.
_abandoned: list[tuple[Any, ...]] = []


def _world() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            "SyncBatchNorm needs mpi4py and an MPI library: pip install mpi4py mpich "
            "(numbabn's [mpi] extra: pip install '.[mpi]' from a checkout)"
        ) from error
    return MPI.COMM_WORLD


class _RankFailed(RuntimeError):
    """Raised on the ranks whose own input was fine when another rank's was not."""


class ExchangeTimeout(RuntimeError):
    """A SyncBatchNorm exchange did not hear from every rank within its timeout.

    The unfinished collective stays posted, so the communicator cannot be used
    for SyncBatchNorm again, and ``MPI_Finalize`` may wait on it: end the job
    with ``comm.Abort()``.
    """


def _comm_key(comm: Any) -> int:
    return comm.py2f()


def _wait(
    comm: Any,
    request: Any,
    deadline: float | None,
    timeout: float | None,
    kind: int,
    keep: tuple[Any, ...],
) -> None:
    """Complete ``request``, or raise :class:`ExchangeTimeout` after ``deadline``."""
    if deadline is None:
        request.Wait()
        return
    # Poll like MPI's own blocking wait; once a peer is clearly late (10 ms), poll every
    # 0.1 ms so that a long wait leaves the core to others (1% at most on the wait).
    spin_until = time.monotonic() + 0.01
    while not request.Test():
        now = time.monotonic()
        if now > deadline:
            _out_of_step.add(_comm_key(comm))
            _abandoned.append((request, *keep))
            raise ExchangeTimeout(
                f"SyncBatchNorm {_KINDS[kind]}: not every rank joined the statistics exchange "
                f"within {timeout:g} s. All ranks must call forward and backward in the same "
                "order, in training mode (a rank in eval mode exchanges nothing); the "
                "communicator is now out of step and later exchanges on it raise"
            )
        if now > spin_until:
            time.sleep(1e-4)


class _Exchange:
    """One exchange: every rank's float64 payload gathered as rows, in rank order.

    The header (whether the rank failed locally, the exchange's ``kind``,
    channels, dtype code) is posted first, before the rank's local pass, so
    its round trip overlaps that pass; :meth:`gather` then waits for every
    header and, only when all agree, gathers the payloads, so a rank that
    fails never leaves the others waiting in a collective it does not join. A
    rank that fails after its header (in the local pass) says so in the
    payload's leading status value. Either way every rank raises: the failing
    rank its own exception, the others an error that names it.
    """

    def __init__(
        self,
        comm: Any,
        kind: int,
        local_error: Exception | None,
        header: tuple[int, int],
        timeout: float | None,
    ) -> None:
        if _comm_key(comm) in _out_of_step:
            raise ExchangeTimeout(
                "an earlier SyncBatchNorm exchange on this communicator timed out; its ranks "
                "are out of step and no exchange can be trusted: end the job with comm.Abort()"
            )
        self.comm, self.kind, self.timeout = comm, kind, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.mine = np.array([local_error is not None, kind, *header], dtype=np.int64)
        self.headers = np.empty((comm.Get_size(), self.mine.size), dtype=np.int64)
        self.request = comm.Iallgather(self.mine, self.headers)

    def _wait(self, request: Any, *keep: Any) -> None:
        _wait(self.comm, request, self.deadline, self.timeout, self.kind, keep)

    def gather(self, local_error: Exception | None, payload: np.ndarray | None) -> np.ndarray:
        """Every rank's ``payload`` as rows in rank order; raise on every rank if any failed.

        ``local_error`` is this rank's failure, before or after its header went
        out; ``payload`` is given whenever there is none.
        """
        self._wait(self.request, self.mine, self.headers)
        rows = self.headers.tolist()  # a few rows: Python compares them faster than NumPy
        if any(row[0] for row in rows):
            self._raise_failure(local_error, [bool(row[0]) for row in rows])
        if any(row[1] != self.kind for row in rows):
            described = ", ".join(
                f"rank {rank}: {_KINDS.get(int(other), '?')}"
                for rank, (_, other, *_) in enumerate(rows)
            )
            raise RuntimeError(f"SyncBatchNorm ranks are out of step ({described})")
        if any(row[2:] != rows[0][2:] for row in rows):
            described = ", ".join(
                f"rank {rank}: {channels} channels {_DTYPE_NAMES.get(int(dtype), '?')}"
                for rank, (_, _, channels, dtype) in enumerate(rows)
            )
            raise ValueError(f"SyncBatchNorm ranks disagree on the input ({described})")
        # The ranks agree on the channels, so on the payload's size.
        size = _payload_size(self.kind, rows[0][2])
        mine = np.empty(1 + size)
        mine[0] = local_error is not None
        if local_error is None:
            assert payload is not None and payload.size == size
            mine[1:] = payload
        else:
            mine[1:] = np.nan
        gathered = np.empty((self.comm.Get_size(), mine.size))
        self._wait(self.comm.Iallgather(mine, gathered), mine, gathered)
        failed = gathered[:, 0].tolist()
        if any(failed):
            self._raise_failure(local_error, [bool(flag) for flag in failed])
        return np.ascontiguousarray(gathered[:, 1:])

    def _raise_failure(self, local_error: Exception | None, failed: list[bool]) -> None:
        """Share the failing ranks' error texts (every rank joins), then raise."""
        text = "" if local_error is None else f"{type(local_error).__name__}: {local_error}"
        mine = np.zeros(_TEXT_BYTES, dtype=np.uint8)
        encoded = text.encode()[:_TEXT_BYTES]
        mine[: len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        texts = np.empty((self.comm.Get_size(), _TEXT_BYTES), dtype=np.uint8)
        self._wait(self.comm.Iallgather(mine, texts), mine, texts)
        if local_error is not None:
            raise local_error
        quoted = [row.tobytes().rstrip(b"\0").decode(errors="replace") for row in texts]
        details = "; ".join(
            f"rank {rank}: {text}" for rank, text in enumerate(quoted) if failed[rank]
        )
        raise _RankFailed(f"SyncBatchNorm failed on another rank ({details})")


def _payload_size(kind: int, n_channels: int) -> int:
    """Values per rank: a statistics row (count, means, M2s) or the two gradient sums."""
    return 1 + 2 * n_channels if kind == FORWARD else 2 * n_channels


class MpiExchange:
    """Batch norm's exchange over MPI: whole-batch statistics and gradient sums.

    What runs between the phases of a :class:`SyncBatchNorm` in training (see
    :class:`numbabn._phases.Exchange`). Only per-channel float64 vectors cross,
    staged through host memory whatever the data's device.
    """

    def __init__(self, comm: Any, timeout: float | None) -> None:
        self.comm = comm
        self.timeout = timeout
        self.count = 0

    def refuse(self, kind: Pass, error: Exception) -> NoReturn:
        exchange = _Exchange(self.comm, kind, error, (-1, -1), self.timeout)
        exchange.gather(error, None)
        raise error  # gather raises first: the header says this rank failed

    def statistics(self, backend: Backend, x: Any) -> ChannelStats:
        exchange = _Exchange(self.comm, FORWARD, None, _header(x), self.timeout)
        payload, error = None, None
        try:  # while the headers travel
            count = x.size // x.shape[1] if x.size else 0
            mean, m2 = backend.moments(x) if count else (np.zeros(x.shape[1]),) * 2
            payload = ChannelStats.row(count, mean, m2)
        except Exception as caught:
            error = caught
        total = ChannelStats.from_rows(exchange.gather(error, payload))  # identical on every rank
        if total.count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {tuple(x.shape)} over all ranks"
            )
        self.count = total.count
        return total

    def normalise(
        self, backend: Backend, x: Any, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
        out: Any | None, epilogue: Epilogue | None,
    ) -> Any:  # fmt: skip
        return backend.affine(x, mean, scale, shift, out, epilogue)

    def gradient_sums(
        self, backend: Backend, dy: Any, x: Any, mean: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        exchange = _Exchange(self.comm, BACKWARD, None, _header(x), self.timeout)
        sums, error = None, None
        try:  # while the headers travel
            sums = backend.grad_sums(dy, x, mean) if x.size else np.zeros((2, x.shape[1]))
        except Exception as caught:
            error = caught
        gathered = exchange.gather(error, None if sums is None else sums.ravel())
        assert sums is not None  # gather raised otherwise
        # Summed in rank order: identical on every rank.
        return sums, gathered.reshape(gathered.shape[0], *sums.shape).sum(axis=0)


def _checked_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
    return timeout


def _header(x: Any) -> tuple[int, int]:
    """What every rank's part must agree on: its channels and dtype."""
    code = _DTYPE_CODES.get(x.dtype)  # a dict look-up: bfloat16's test reads the dtype's name
    if code is None:
        code = _BFLOAT16_CODE if is_bfloat16(x.dtype) else _DTYPE_CODES[x.dtype]
    return x.shape[1], code


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the whole batch spread across MPI ranks.

    Like ``torch.nn.SyncBatchNorm``: in training, every rank normalises with the
    statistics of the union of all ranks' batches (uneven and empty per-rank
    batches included) and ends with the same running statistics and counter;
    ``backward`` returns this rank's slice of the whole-batch input gradient.
    Parameter gradients are this rank's contribution, as in PyTorch: summed
    over ranks (what data-parallel training all-reduces) they are the
    whole-batch gradients. Evaluation communicates nothing.

    It is a batch-norm module whose training passes run their phases with an
    :class:`MpiExchange` between them, on the CPU or on a GPU (``device="cuda"``:
    each rank's data stays on its GPU, the per-channel vectors go through host
    memory).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`numbabn.BatchNorm1d`.
    comm : mpi4py communicator, optional
        The ranks that share statistics; ``MPI.COMM_WORLD`` by default.
    timeout : float or None
        Seconds an exchange waits for every rank (30 minutes by default, as
        ``torch.distributed``; None waits forever). Past it the waiting ranks
        raise :class:`ExchangeTimeout`, and every later exchange on ``comm``
        raises too: the unfinished collective would pair with the next one.

    Notes
    -----
    Arguments are checked as ``torch.nn.SyncBatchNorm`` checks them, with its
    texts and in its order (``eps`` and ``momentum`` at each call), except
    that "more than 1 value per channel" counts the values of all ranks, so
    it comes after the other checks. Any array the other modules take is
    taken, and results come back as the caller's kind of array.

    A local failure on one rank (a wrong shape, dtype or channel count, a
    backward without a forward) makes every rank raise, and the call changes
    no state anywhere. NaN or infinite data on one rank give every rank
    PyTorch's statistics of the whole batch: the affected channels' variance
    is NaN, their mean infinite for infinite data of one sign and NaN otherwise.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: str | None = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        comm: Any = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        timeout = _checked_timeout(timeout)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self._mpi = MpiExchange(_world() if comm is None else comm, timeout)
        self._exchange = self._mpi

    @property
    def comm(self) -> Any:
        """The communicator of the ranks that share statistics."""
        return self._mpi.comm

    @property
    def timeout(self) -> float | None:
        """Seconds an exchange waits for every rank (None: forever)."""
        return self._mpi.timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        self._mpi.timeout = _checked_timeout(timeout)

    def _check_input(self, x: Any) -> None:
        """``torch.nn.SyncBatchNorm``'s checks of the input's rank and channels."""
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
        if x.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, x: Any, out: Any | None = None, *, residual: Any | None = None) -> Any:
        """Normalise ``x`` with whole-batch statistics (training) or running ones (eval).

        ``x`` and ``out`` are arrays on the module's device, as for
        :meth:`numbabn.BatchNorm1d.forward`; the output is of the kind of ``x``,
        or ``out`` itself.
        """
        if residual is not None:
            raise ValueError("SyncBatchNorm has no fused residual add; add the residual after it")
        return super().forward(x, out)

    @classmethod
    def convert_sync_batchnorm(cls, module: Any, comm: Any = None) -> Any:
        """Return ``module`` with every batch-norm module replaced by a SyncBatchNorm.

        A batch-norm module becomes a SyncBatchNorm that shares its arrays
        (parameters, running statistics, counter, gradients). Lists, tuples and
        dicts are rebuilt with their items converted; other objects have their
        attributes converted in place.
        """
        communicator = _world() if comm is None else comm
        return _convert(module, cls, communicator, set())


def _convert(item: Any, cls: type[SyncBatchNorm], comm: Any, seen: set[int]) -> Any:
    if isinstance(item, _BatchNorm) and not isinstance(item, SyncBatchNorm):
        if item.num_features == 0:
            raise ValueError("initialise a lazy batch-norm module before converting it")
        if item.activation is not None:
            raise ValueError(f"SyncBatchNorm has no fused activation; cannot convert {item!r}")
        synced = cls(
            item.num_features, item.eps, item.momentum, item.affine, item.track_running_stats,
            item.device, item.dtype, bias=item.has_bias, comm=comm,
        )  # fmt: skip
        synced.share_state(item)
        synced.train(item.training)
        return synced
    if id(item) in seen or isinstance(item, np.ndarray | str | bytes | int | float):
        return item
    seen.add(id(item))
    if isinstance(item, list | tuple):
        return type(item)(_convert(member, cls, comm, seen) for member in item)
    if isinstance(item, dict):
        return type(item)((key, _convert(value, cls, comm, seen)) for key, value in item.items())
    if hasattr(item, "__dict__") and not isinstance(item, type):
        for name, value in vars(item).items():
            setattr(item, name, _convert(value, cls, comm, seen))
    return item
