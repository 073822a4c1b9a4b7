"""Batch norm's phases in their order, written once for every caller.

A training forward is per-channel moments, coefficients from them (updating
the running statistics), and an elementwise pass; a backward is gradient sums,
then the input gradient from them. For one array in one process a backend runs
each pass fused (:meth:`Backend.train_forward`, ...). When the batch is spread
over MPI ranks or Dask blocks, an :class:`Exchange` runs between the phases:
it turns local statistics into the whole batch's, and the backend's phases do
the rest. The functional API, the modules, ``SyncBatchNorm`` and
``numbabn.dask`` all come here; the per-channel arithmetic itself is
:mod:`numbabn._coefficients`.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, NoReturn, Protocol

import numpy as np

from numbabn import _coefficients
from numbabn._dispatch import Backend
from numbabn.epilogue import Epilogue
from numbabn.stats import ChannelStats


class SavedStats(NamedTuple):
    """What :func:`numbabn.functional.batch_norm_backward` needs from the forward pass.

    Attributes
    ----------
    mean : ndarray or device array
        Per-channel mean used to normalise, float64, shape ``(C,)``, on the
        input's device (a Numba device array for CUDA input).
    invstd : ndarray or device array
        Per-channel ``1 / sqrt(var + eps)``, float64, shape ``(C,)``.
    batch_stats : bool
        True when ``mean`` and ``invstd`` are the batch's own (training), so
        the gradient flows through them; False when they are running statistics.
    """

    mean: Any
    invstd: Any
    batch_stats: bool


class Running(NamedTuple):
    """The running statistics a training forward updates, and the weight of the batch."""

    mean: Any | None
    var: Any | None
    momentum: float


class Affine(NamedTuple):
    """A call's per-channel weight and bias (in the forward, missing ones filled with 1 and 0;
    in the backward, ``weight`` None means no affine parameters)."""

    weight: Any
    bias: Any


class Pass(enum.IntEnum):
    """The two passes an exchange serves."""

    FORWARD = 1
    BACKWARD = 2


FORWARD, BACKWARD = Pass.FORWARD, Pass.BACKWARD


class Exchange(Protocol):
    """What happens between a forward's phases when one batch is spread over ranks or
    blocks: the whole batch's statistics, and the elementwise pass over this part."""

    def statistics(self, backend: Backend, x: Any) -> ChannelStats:
        """The whole batch's per-channel count, mean and M2, given this part ``x``."""
        ...

    def normalise(
        self, backend: Backend, x: Any, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
        out: Any | None, epilogue: Epilogue | None,
    ) -> Any:  # fmt: skip
        """The elementwise pass over ``x`` with the whole batch's coefficients."""
        ...


class TrainingExchange(Exchange, Protocol):
    """An exchange that a module holds for training, backward included.

    When a call fails its checks on one part, :meth:`refuse` makes every part
    raise, so that none waits for it.
    """

    #: Values per channel of the whole batch in the last :meth:`statistics`.
    count: int

    def refuse(self, kind: Pass, error: Exception) -> NoReturn:
        """Tell the other parts that this one's ``kind`` pass failed with ``error``; raise."""
        ...

    def gradient_sums(
        self, backend: Backend, dy: Any, x: Any, mean: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """``[sum(dy), sum(dy * (x - mean))]``, shape ``(2, C)``: this part's, then the
        whole batch's."""
        ...


def with_defaults(backend: Backend, affine: Affine, n_channels: int, dtype: np.dtype) -> Affine:
    """``affine`` with missing parameters replaced by shared constants 1 and 0."""
    weight, bias = affine
    if weight is None:
        weight = backend.filled(1.0, n_channels, dtype)
    if bias is None:
        bias = backend.filled(0.0, n_channels, dtype)
    return Affine(weight, bias)


def forward(
    backend: Backend,
    x: Any,
    running: Running,
    affine: Affine,
    training: bool,
    eps: float,
    out: Any | None,
    epilogue: Epilogue | None,
    exchange: Exchange | None = None,
) -> tuple[Any, SavedStats]:
    """Normalise ``x`` (checked arrays of ``backend``'s kind; weight and bias given).

    Without an ``exchange`` the backend's fused passes run; with one, the
    statistics are the exchange's and so is the elementwise pass.
    """
    weight, bias = affine
    if exchange is None:
        if x.size == 0:  # an empty batch: empty output, running statistics untouched
            return _empty_forward(backend, x, out, training)
        if training:
            output, mean, invstd = backend.train_forward(
                x, weight, bias, running.mean, running.var, running.momentum, eps, out, epilogue
            )
        else:
            output, mean, invstd = backend.eval_forward(
                x, running.mean, running.var, weight, bias, eps, out, epilogue
            )
        return output, SavedStats(mean, invstd, training)
    if training:
        stats = exchange.statistics(backend, x)
        if stats.count == 0:
            return _empty_forward(backend, x, out, training)
        mean = stats.mean
        invstd, scale, shift = backend.train_coefficients(
            mean, stats.m2, stats.count, weight, bias, eps, running.mean, running.var,
            running.momentum,
        )  # fmt: skip
    else:
        mean, invstd, scale, shift = backend.eval_coefficients(
            running.mean, running.var, weight, bias, eps
        )
    if x.size == 0:  # this part holds none of the batch
        output = backend.empty_like(x) if out is None else out
    else:
        output = exchange.normalise(backend, x, mean, scale, shift, out, epilogue)
    return output, SavedStats(mean, invstd, training)


def _empty_forward(
    backend: Backend, x: Any, out: Any | None, training: bool
) -> tuple[Any, SavedStats]:
    n_channels = x.shape[1]
    output = backend.empty_like(x) if out is None else out
    stats = (backend.from_host(np.zeros(n_channels)), backend.from_host(np.ones(n_channels)))
    return output, SavedStats(*stats, training)


def backward(
    backend: Backend,
    dy: Any,
    x: Any,
    saved: SavedStats,
    affine: Affine,
    param_dtype: np.dtype,
    out: Any | None,
    epilogue: Epilogue | None,
    exchange: TrainingExchange | None = None,
    count: int = 0,
) -> tuple[Any, Any | None, Any | None, Any | None]:
    """``(dx, dweight, dbias, dz)`` of checked arrays; ``dz`` (the residual's gradient) is None
    when it is ``dy`` itself or there is no residual, the parameter gradients when
    ``affine.weight`` is None. With an ``exchange`` the gradient sums cover the whole batch
    of ``count`` values per channel; the parameter gradients are this part's, as in
    PyTorch."""
    n_channels = x.shape[1]
    weight = affine.weight
    if exchange is not None:
        return _exchanged_backward(backend, dy, x, saved, weight, param_dtype, out, exchange, count)
    if x.size == 0:
        grad_input = backend.empty_like(x) if out is None else out
        grad_weight = grad_bias = None
        if weight is not None:
            zeros = np.zeros(n_channels, weight.dtype)
            grad_weight, grad_bias = backend.from_host(zeros), backend.from_host(zeros)
        return grad_input, grad_weight, grad_bias, backend.empty_like(x)
    if epilogue is not None and epilogue.relu:
        filled = with_defaults(backend, affine, n_channels, param_dtype)
        grad_input, grad_residual, grad_weight, grad_bias = backend.masked_backward(
            dy, x, saved.mean, saved.invstd, filled.weight, filled.bias, saved.batch_stats,
            epilogue, out,
        )  # fmt: skip
        return grad_input, grad_weight, grad_bias, grad_residual
    if saved.batch_stats:
        stand_in = _or_ones(backend, weight, n_channels, param_dtype)
        grads = backend.train_backward(dy, x, saved.mean, saved.invstd, stand_in, out)
    else:
        grads = backend.eval_backward(dy, x, saved.mean, saved.invstd, weight, out)
    return (*grads, None)


def _exchanged_backward(
    backend: Backend,
    dy: Any,
    x: Any,
    saved: SavedStats,
    weight: Any | None,
    param_dtype: np.dtype,
    out: Any | None,
    exchange: TrainingExchange,
    count: int,
) -> tuple[Any, Any | None, Any | None, Any | None]:
    local, total = exchange.gradient_sums(backend, dy, x, saved.mean)
    if x.size:
        stand_in = _or_ones(backend, weight, x.shape[1], param_dtype)
        grad_input = backend.grad_input_from_sums(
            dy, x, saved.mean, saved.invstd, stand_in, total, count, out
        )
    else:
        grad_input = backend.empty_like(x) if out is None else out
    if weight is None:
        return grad_input, None, None, None
    # The statistics came through the exchange, so they are host vectors.
    grad_weight, grad_bias = parameter_gradients(local, saved.invstd, weight.dtype)
    return grad_input, backend.from_host(grad_weight), backend.from_host(grad_bias), None


def _or_ones(backend: Backend, weight: Any | None, n_channels: int, dtype: np.dtype) -> Any:
    return weight if weight is not None else backend.filled(1.0, n_channels, dtype)


def parameter_gradients(
    sums: np.ndarray, invstd: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(dweight, dbias)`` in ``dtype`` from host ``sums = [sum(dy), sum(dy * (x - mean))]``."""
    grad_weight, grad_bias = _coefficients.parameter_gradients(sums[0], sums[1], invstd)
    return grad_weight.astype(dtype), grad_bias.astype(dtype)
