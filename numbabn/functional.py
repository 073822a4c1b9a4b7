"""Stateless batch normalization: forward, backward and PyTorch's ``batch_norm``.

The modules in :mod:`numbabn.modules` own the state (parameters, running
statistics, gradients) and call these functions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from numbabn import _validation as check
from numbabn._dispatch import Backend, backend_for

__all__ = ["SavedStats", "batch_norm", "batch_norm_backward", "batch_norm_forward"]


class SavedStats(NamedTuple):
    """What :func:`batch_norm_backward` needs from the forward pass.

    Attributes
    ----------
    mean : ndarray
        Per-channel mean used to normalise, float64, shape ``(C,)``.
    invstd : ndarray
        Per-channel ``1 / sqrt(var + eps)``, float64, shape ``(C,)``.
    batch_stats : bool
        True when ``mean`` and ``invstd`` are the batch's own (training), so
        the gradient flows through them; False when they are running statistics.
    """

    mean: np.ndarray
    invstd: np.ndarray
    batch_stats: bool


@functools.lru_cache(maxsize=64)
def _filled(value: float, n_channels: int, dtype: np.dtype) -> np.ndarray:
    """A shared constant vector standing in for a missing weight, bias or buffer."""
    return np.full(n_channels, value, dtype)


def _or_filled(vector: np.ndarray | None, value: float, like: np.ndarray) -> np.ndarray:
    if vector is not None:
        return vector
    return _filled(value, like.shape[1], like.dtype)


def check_forward_args(
    input: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    out: np.ndarray | None,
) -> Backend:
    """Validate a forward call's arrays and return the backend that serves them."""
    backend = backend_for(
        input=input,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
        out=out,
    )
    if input.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {input.ndim}D input)")
    check.check_dtype(input)
    for name, vector in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        check.check_channel_vector(name, vector, input)
    check.check_out(out, input)
    return backend


def batch_norm_forward(
    input: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, SavedStats]:
    """Normalise ``input`` per channel and return what the backward pass needs.

    Parameters
    ----------
    input : ndarray
        Shape ``(N, C, *spatial)``, float32 or float64, any strides.
    running_mean, running_var : ndarray or None
        Running statistics, shape ``(C,)``, same dtype as ``input``. Updated in
        place when ``training`` is True (the variance with Bessel's correction):
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
        Required when ``training`` is False.
    weight, bias : ndarray or None
        Affine parameters, shape ``(C,)``; None means 1 and 0.
    training : bool
        Use the batch's statistics (True) or the running ones (False).
    momentum : float
        Weight of the batch statistic in the running-statistics update.
    eps : float
        Added to the variance inside the square root.
    out : ndarray, optional
        Array to write the output into (shape and dtype of ``input``).

    Returns
    -------
    output : ndarray
        The normalised batch, laid out like ``input`` in memory.
    saved : SavedStats
        Per-channel mean and inverse standard deviation used.

    Raises
    ------
    ValueError, RuntimeError, TypeError
        On a bad shape, channel count or dtype, with PyTorch's texts; nothing
        is modified then.
    """
    backend = check_forward_args(input, running_mean, running_var, weight, bias, out)
    if training:
        check.check_batch_size(input)
    elif running_mean is None or running_var is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")

    n_channels = input.shape[1]
    if input.size == 0:
        # An empty batch: empty output, running statistics untouched.
        output = np.empty_like(input) if out is None else out
        return output, SavedStats(np.zeros(n_channels), np.ones(n_channels), training)

    weight = _or_filled(weight, 1.0, input)
    bias = _or_filled(bias, 0.0, input)
    if training:
        update = running_mean is not None and running_var is not None
        empty = _filled(0.0, 0, input.dtype)
        output, mean, invstd = backend.train_forward(
            input,
            weight,
            bias,
            running_mean if update else empty,
            running_var if update else empty,
            momentum,
            eps,
            out,
        )
    else:
        mean = running_mean.astype(np.float64)
        invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        output = backend.affine(input, mean, invstd * weight, bias.astype(np.float64), out)
    return output, SavedStats(mean, invstd, training)


def batch_norm(
    input: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    See :func:`batch_norm_forward` for the parameters; this returns only the
    output. Running statistics are updated in place when ``training`` is True.
    """
    output, _ = batch_norm_forward(
        input, running_mean, running_var, weight, bias, training, momentum, eps, out=out
    )
    return output


def batch_norm_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    saved: SavedStats,
    weight: np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of batch normalization.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss w.r.t. the output; shape and dtype of ``input``.
    input : ndarray
        The forward pass's input.
    saved : SavedStats
        Returned by :func:`batch_norm_forward` for that input.
    weight : ndarray or None
        The forward pass's weight (None for no affine parameters).
    out : ndarray, optional
        Array to write the input gradient into.

    Returns
    -------
    grad_input : ndarray
        Gradient w.r.t. ``input``.
    grad_weight, grad_bias : ndarray or None
        ``sum(grad_output * xhat)`` and ``sum(grad_output)`` per channel, in the
        dtype of ``weight``; None when ``weight`` is None.
    """
    backend = backend_for(grad_output=grad_output, input=input, weight=weight, out=out)
    check.check_like("grad_output", grad_output, input)
    check.check_dtype(input)
    check.check_channel_vector("weight", weight, input)
    check.check_out(out, input)
    n_channels = input.shape[1]
    if saved.mean.shape != (n_channels,):
        raise ValueError(
            f"saved statistics are for {saved.mean.shape[0]} channels but the input has "
            f"{n_channels}"
        )
    if input.size == 0:
        grad_input = np.empty_like(input) if out is None else out
        if weight is None:
            return grad_input, None, None
        return grad_input, np.zeros_like(weight), np.zeros_like(weight)

    mean, invstd = saved.mean, saved.invstd
    if saved.batch_stats:
        grad_input, sum_dy, sum_dy_xmu = backend.train_backward(
            grad_output, input, mean, invstd, _or_filled(weight, 1.0, input), out
        )
    else:
        zeros = np.zeros(n_channels)
        scale = invstd if weight is None else weight * invstd
        grad_input = backend.affine(grad_output, zeros, scale, zeros, out)
        if weight is not None:
            sum_dy, sum_dy_xmu = backend.grad_sums(grad_output, input, mean)
    if weight is None:
        return grad_input, None, None
    grad_weight = (sum_dy_xmu * invstd).astype(weight.dtype)
    return grad_input, grad_weight, sum_dy.astype(weight.dtype)
