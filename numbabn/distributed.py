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
from typing import TYPE_CHECKING, Any

import numpy as np

from numbabn import _validation as check
from numbabn._dispatch import Backend, kind_of
from numbabn.functional import SavedStats, check_forward_args
from numbabn.modules import _BatchNorm
from numbabn.stats import ChannelStats

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["ExchangeTimeout", "SyncBatchNorm"]

# Exchanges wait this long for every rank by default: torch.distributed's default
# process-group timeout. A rank that never joins (one in eval mode while the
# others train, one that died) then makes the others raise instead of hanging.
DEFAULT_TIMEOUT = 1800.0

_FORWARD, _BACKWARD = 1, 2
_KINDS = {_FORWARD: "forward", _BACKWARD: "backward"}
_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
_DTYPE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
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
            "SyncBatchNorm needs mpi4py and an MPI library: pip install 'numbabn[mpi]'"
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
    return 1 + 2 * n_channels if kind == _FORWARD else 2 * n_channels


def _check_host(device: str | None) -> None:
    if device not in (None, "cpu"):
        raise ValueError(
            f"SyncBatchNorm exchanges host arrays over MPI and runs on 'cpu'; got device {device!r}"
        )


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the whole batch spread across MPI ranks.

    Like ``torch.nn.SyncBatchNorm``: in training, every rank normalises with the
    statistics of the union of all ranks' batches (uneven and empty per-rank
    batches included) and ends with the same running statistics and counter;
    ``backward`` returns this rank's slice of the whole-batch input gradient.
    Parameter gradients are this rank's contribution, as in PyTorch: summed
    over ranks (what data-parallel training all-reduces) they are the
    whole-batch gradients. Evaluation communicates nothing.

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
    it comes after the other checks. Any host array is taken, as by the other
    modules, and results come back as the caller's kind of array.

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
        _check_host(device)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.comm = _world() if comm is None else comm
        self.timeout = timeout
        self._total_count: int | None = None

    def to(self, device: Any = None, dtype: Any = None) -> Self:
        """Convert the parameters, running statistics and gradients; stay on the CPU.

        As :meth:`numbabn.BatchNorm1d.to`: ``to(np.float64)``,
        ``to(dtype=np.float32)``, ``to("cpu", np.float64)``; return self.

        Raises
        ------
        ValueError
            For any device other than ``"cpu"``.
        """
        if device is None or isinstance(device, str):
            _check_host(device)
        return super().to(device, dtype)

    def _check_input(self, x: Any) -> None:
        """``torch.nn.SyncBatchNorm``'s checks of the input's rank and channels."""
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
        if x.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _check_kind(self, x: Any, name: str) -> None:
        """Raise TypeError unless ``x`` is a host array (SyncBatchNorm exchanges host data)."""
        kind = kind_of(x)  # TypeError, naming what is accepted, for anything else
        if kind != "cpu":
            raise TypeError(
                f"SyncBatchNorm exchanges statistics of host arrays but the {name} is a {kind} "
                f"array; move the {name} to the CPU"
            )

    def forward(self, x: Any, out: Any | None = None, *, residual: None = None) -> Any:
        """Normalise ``x`` with whole-batch statistics (training) or running ones (eval).

        ``x`` and ``out`` are host arrays of any library, as for
        :meth:`numbabn.BatchNorm1d.forward`; the output is of the kind of ``x``,
        or ``out`` itself.
        """
        if residual is not None:
            raise ValueError("SyncBatchNorm has no fused residual add; add the residual after it")
        if not self.training:
            output = super().forward(x, out)
            self._total_count = None  # a local forward: backward stays local too
            return output
        backend, error, header = None, None, (-1, -1)
        array: Any = None
        out_array: Any = None
        try:
            array = self._adopt(x, "input")
            self._check_input(array)
            backend, array, out_array = self._checked_args(array, out)
            header = (array.shape[1], _DTYPE_CODES[array.dtype])
        except Exception as caught:  # any local failure: the other ranks must hear of it
            error = caught
        exchange = _Exchange(self.comm, _FORWARD, error, header, self.timeout)
        payload = None
        if backend is not None and error is None:
            try:  # while the headers travel
                count = array.size // array.shape[1] if array.size else 0
                mean, m2 = backend.moments(array) if count else (np.zeros(array.shape[1]),) * 2
                payload = ChannelStats.row(count, mean, m2)
            except Exception as caught:
                error = caught
        gathered = exchange.gather(error, payload)
        total = ChannelStats.from_rows(gathered)  # in rank order: identical on every rank
        if total.count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {tuple(array.shape)} over all ranks"
            )
        assert backend is not None  # gather raised otherwise
        output, saved = self._normalise(array, out_array, backend, total)
        self._remember(x, saved, out)
        self._total_count = total.count
        return out if out is not None else self._backend.like(output, x)

    def _checked_args(self, x: np.ndarray, out: Any | None) -> tuple[Backend, np.ndarray, Any]:
        """Check a training call's arguments as PyTorch's SyncBatchNorm passes them on.

        Without a process group, ``torch.nn.SyncBatchNorm`` is ``F.batch_norm``
        with the running-average factor as ``momentum``: the same checks, texts
        and order (the batch size apart, counted over all ranks later).
        Returns the backend, the input and ``out`` as NumPy arrays.
        """
        momentum = self._momentum_argument(self.track_running_stats)
        try:
            checked, arrays = check_forward_args(
                x, self.running_mean, self.running_var, self.weight, self.bias, out,
                True, momentum, self.eps,
            )  # fmt: skip
        except RuntimeError as error:
            self._explain_dtype_mismatch(error, x.dtype)
            raise
        return checked, arrays[0], arrays[-1]

    def _normalise(
        self, x: np.ndarray, out: np.ndarray | None, backend: Backend, total: ChannelStats
    ) -> tuple[np.ndarray, SavedStats]:
        """Normalise ``x`` with ``total``; update the running statistics and counter.

        Returns the output (``out`` when given) and what backward needs.
        """
        n_channels = x.shape[1]
        tracking = self.track_running_stats
        if total.count == 0:
            output = np.empty_like(x) if out is None else out
            saved = SavedStats(np.zeros(n_channels), np.ones(n_channels), True)
        else:
            filled = backend.filled
            running = (self.running_mean, self.running_var) if tracking else (None, None)
            weight = filled(1.0, n_channels, x.dtype) if self.weight is None else self.weight
            bias = filled(0.0, n_channels, x.dtype) if self.bias is None else self.bias
            invstd, scale, shift = backend.train_coefficients(
                total.mean, total.m2, total.count, weight, bias, self.eps, *running,
                self._momentum_factor() if tracking else 0.0,
            )  # fmt: skip
            output = backend.affine(x, total.mean, scale, shift, out)
            saved = SavedStats(total.mean, invstd, True)
        if tracking:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked += 1
        return output, saved

    def backward(self, grad_output: Any, out: Any | None = None) -> Any:
        """This rank's slice of the whole-batch input gradient; accumulate local grads.

        ``grad_output`` and ``out`` are host arrays of any library; the gradient
        is of the kind of the last forward's input, or ``out`` itself.
        """
        # A training forward's backward exchanges; so does a training-mode backward
        # without a forward, so that its error reaches the ranks waiting for it.
        exchanging = self.training if self._saved is None else self._total_count is not None
        if not exchanging:
            return super().backward(grad_output, out)
        sums, backend, error, header = None, None, None, (-1, -1)
        x: Any = None
        dy: Any = None
        out_array: Any = None
        try:
            last = self._saved_for_backward()
            saved = last.stats
            checked, arrays = check_forward_args(last.input, None, None, self.weight, None, out)
            backend = checked
            x, out_array = arrays[0], arrays[-1]
            self._check_kind(grad_output, "grad_output")
            dy = backend.adopt(grad_output)
            check.check_like("grad_output", dy, x, "the last forward's input")
            header = (x.shape[1], _DTYPE_CODES[x.dtype])
        except Exception as caught:  # any local failure: the other ranks must hear of it
            error = caught
        exchange = _Exchange(self.comm, _BACKWARD, error, header, self.timeout)
        if backend is not None and error is None:
            try:  # while the headers travel
                sums = backend.grad_sums(dy, x, saved.mean) if x.size else np.zeros((2, x.shape[1]))
            except Exception as caught:
                error = caught
        gathered = exchange.gather(error, None if sums is None else sums.ravel())
        # gather raised unless this rank's forward, checks and sums went through.
        assert sums is not None and backend is not None and self._total_count is not None
        # Summed in rank order: identical on every rank.
        total = gathered.reshape(gathered.shape[0], *sums.shape).sum(axis=0)
        if x.size == 0:
            grad_input = np.empty_like(x) if out is None else out_array
        else:
            weight = np.ones(x.shape[1], x.dtype) if self.weight is None else self.weight
            grad_input = backend.grad_input_from_sums(
                dy, x, saved.mean, saved.invstd, weight, total, self._total_count, out_array
            )
        # This rank's share of the parameter gradients, as in PyTorch.
        self._accumulate_grads(
            (sums[1] * saved.invstd).astype(self.dtype), sums[0].astype(self.dtype)
        )
        return out if out is not None else self._backend.like(grad_input, last.input)

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
        if item.activation is not None or item.device != "cpu":
            raise ValueError(
                "SyncBatchNorm runs on the CPU without a fused activation; "
                f"cannot convert {item!r} on {item.device}"
            )
        synced = cls.__new__(cls)
        synced.__dict__ = item.__dict__.copy()  # the same arrays and grads dict
        synced.comm = comm
        synced.timeout = DEFAULT_TIMEOUT
        synced._total_count = None
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
