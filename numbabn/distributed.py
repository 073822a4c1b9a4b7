"""SyncBatchNorm: batch statistics over the union of all MPI ranks' batches.

Each training forward makes one collective (an ``allgather`` of a small header
and the per-channel count, mean and M2) and each backward one more (the
per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``). Only per-channel vectors
cross; the data stays where it is. Gathered values are merged in rank order, so
every rank computes bit-identical statistics, run after run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numbabn import _validation as check
from numbabn.functional import SavedStats, check_forward_args
from numbabn.modules import _BatchNorm
from numbabn.stats import ChannelStats

__all__ = ["SyncBatchNorm"]

_LOCAL_ERRORS = (ValueError, TypeError, RuntimeError)


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


def _exchange(comm: Any, local_error: Exception | None, payload: Any) -> list[Any]:
    """Allgather ``payload``; if any rank failed locally, raise on every rank.

    The failing rank re-raises its own exception; the others raise an error
    that names it, instead of waiting forever in a collective it never joins.
    """
    message = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
    gathered = comm.allgather((message, payload))
    failures = [(rank, text) for rank, (text, _) in enumerate(gathered) if text is not None]
    if local_error is not None:
        raise local_error
    if failures:
        details = "; ".join(f"rank {rank}: {text}" for rank, text in failures)
        raise _RankFailed(f"SyncBatchNorm failed on another rank ({details})")
    return [item for _, item in gathered]


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
    ) -> None:
        _check_host(device)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.comm = _world() if comm is None else comm
        self._total_count: int | None = None

    def to(self, device: str) -> SyncBatchNorm:
        """Stay on the CPU (``"cpu"``); any other device raises ValueError."""
        _check_host(device)
        return self

    def _check_input(self, x: np.ndarray) -> None:
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"expected a NumPy array, got {type(x).__qualname__} "
                "(SyncBatchNorm exchanges statistics of host arrays)"
            )
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")

    def forward(
        self, x: np.ndarray, out: np.ndarray | None = None, *, residual: None = None
    ) -> np.ndarray:
        """Normalise ``x`` with whole-batch statistics (training) or running ones (eval)."""
        if residual is not None:
            raise ValueError("SyncBatchNorm has no fused residual add; add the residual after it")
        if not self.training:
            self._total_count = None  # a local forward: backward stays local too
            return super().forward(x, out)
        stats, backend, error = None, None, None
        try:
            self._check_input(x)
            backend, _ = check_forward_args(
                x, self.running_mean, self.running_var, self.weight, self.bias, out
            )
            stats = ChannelStats(x.shape[1])
            if x.size:
                stats._merge_moments(x.size // x.shape[1], *backend.moments(x))
        except _LOCAL_ERRORS as caught:
            error = caught
        header = None if error else (x.shape[1], str(x.dtype))
        gathered = _exchange(self.comm, error, (header, None if error else stats.to_dict()))
        headers = [item[0] for item in gathered]
        if any(other != header for other in headers):
            described = ", ".join(
                f"rank {rank}: {channels} channels {dtype}"
                for rank, (channels, dtype) in enumerate(headers)
            )
            raise ValueError(f"SyncBatchNorm ranks disagree on the input ({described})")
        total = ChannelStats(x.shape[1])
        for _, state in gathered:
            total.merge(ChannelStats.from_dict(state))
        if total.count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {tuple(x.shape)} over all ranks"
            )
        return self._normalise(x, out, backend, total)

    def _normalise(self, x: np.ndarray, out: np.ndarray | None, backend: Any, total: ChannelStats):
        n_channels = x.shape[1]
        tracking = self.track_running_stats
        if total.count == 0:
            output = np.empty_like(x) if out is None else out
            saved = SavedStats(np.zeros(n_channels), np.ones(n_channels), True)
        else:
            invstd = 1.0 / np.sqrt(total.var + self.eps)
            weight = np.ones(n_channels) if self.weight is None else self.weight
            bias = np.zeros(n_channels) if self.bias is None else self.bias
            output = backend.affine(x, total.mean, invstd * weight, bias.astype(np.float64), out)
            if tracking:
                factor = self._momentum_factor()
                self.running_mean[...] = (1 - factor) * self.running_mean + factor * total.mean
                self.running_var[...] = (
                    1 - factor
                ) * self.running_var + factor * total.unbiased_var
            saved = SavedStats(total.mean, invstd, True)
        if tracking:
            self.num_batches_tracked += 1
        self._remember(x, saved, out)
        self._total_count = total.count
        return output

    def backward(self, grad_output: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """This rank's slice of the whole-batch input gradient; accumulate local grads."""
        last = self._saved_for_backward()
        x, saved = last.input, last.stats
        if self._total_count is None:
            return super().backward(grad_output, out)
        sums, backend, error = None, None, None
        try:
            backend, _ = check_forward_args(x, None, None, self.weight, None, out)
            if not isinstance(grad_output, np.ndarray):
                raise TypeError(f"expected a NumPy array, got {type(grad_output).__qualname__}")
            check.check_like("grad_output", grad_output, x, "the last forward's input")
            sums = np.zeros((2, x.shape[1]))
            if x.size:
                sums[...] = backend.grad_sums(grad_output, x, saved.mean)
        except _LOCAL_ERRORS as caught:
            error = caught
        gathered = _exchange(self.comm, error, sums)
        total = np.zeros_like(sums)
        for rank_sums in gathered:  # in rank order: identical on every rank
            total += rank_sums
        if x.size == 0:
            grad_input = np.empty_like(x) if out is None else out
        else:
            weight = np.ones(x.shape[1], x.dtype) if self.weight is None else self.weight
            grad_input = backend.grad_input_from_sums(
                grad_output, x, saved.mean, saved.invstd, weight, total, self._total_count, out
            )
        # This rank's share of the parameter gradients, as in PyTorch.
        self._accumulate_grads(
            (sums[1] * saved.invstd).astype(self.dtype), sums[0].astype(self.dtype)
        )
        return grad_input

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
