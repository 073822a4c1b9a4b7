"""Slow, obviously-correct batch normalization in plain NumPy float64.

This is the truth the fast kernels are tested against. Every quantity is
computed per channel, with an explicit loop over channels and the textbook
two-pass formulas, in float64 whatever the input dtype. Nothing here is
clever; if it reads like the formulas in docs/design.md (Formulas), it is right.

Inputs have shape ``(N, C, *spatial)``; statistics are per channel ``c`` over
``x[:, c, ...]``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ForwardResult(NamedTuple):
    """Everything one forward pass produces, all float64 (except the counter)."""

    output: np.ndarray
    mean: np.ndarray  # mean used to normalise, shape (C,)
    invstd: np.ndarray  # 1 / sqrt(var + eps) used to normalise, shape (C,)
    running_mean: np.ndarray | None  # after the update (or unchanged)
    running_var: np.ndarray | None
    num_batches_tracked: int | None


class BackwardResult(NamedTuple):
    grad_input: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray


def channel_values(x: np.ndarray, c: int) -> np.ndarray:
    """All values of channel ``c`` as a flat float64 vector."""
    return np.asarray(x[:, c], dtype=np.float64).ravel()


def batch_mean_var(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (``/ n``), two-pass, float64."""
    n_channels = x.shape[1]
    mean = np.zeros(n_channels)
    var = np.zeros(n_channels)
    for c in range(n_channels):
        values = channel_values(x, c)
        mean[c] = values.sum() / values.size
        var[c] = ((values - mean[c]) ** 2).sum() / values.size
    return mean, var


def _vector(v: np.ndarray | None, default: float, n_channels: int) -> np.ndarray:
    if v is None:
        return np.full(n_channels, default)
    return np.asarray(v, dtype=np.float64).copy()


def forward(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int | None = None,
) -> ForwardResult:
    """Batch-norm forward, the way ``torch.nn.functional.batch_norm`` defines it.

    ``training=True`` normalises with the batch statistics and, when running
    statistics are given, updates copies of them with ``momentum`` (or, when
    ``momentum`` is None, with the cumulative-average factor
    ``1 / (num_batches_tracked + 1)``). ``training=False`` normalises with the
    running statistics. Nothing passed in is modified.
    """
    n_channels = x.shape[1]
    w = _vector(weight, 1.0, n_channels)
    b = _vector(bias, 0.0, n_channels)
    new_rm = None if running_mean is None else _vector(running_mean, 0.0, n_channels)
    new_rv = None if running_var is None else _vector(running_var, 1.0, n_channels)
    new_count = num_batches_tracked

    if training:
        if new_count is not None:
            new_count = new_count + 1
        if x.size == 0:
            mean = np.zeros(n_channels)
            invstd = np.ones(n_channels)
            return ForwardResult(np.zeros(x.shape), mean, invstd, new_rm, new_rv, new_count)
        mean, var = batch_mean_var(x)
        # momentum=None: cumulative average, the counter already counts this batch.
        factor = 1.0 / new_count if momentum is None else momentum
        n = x.size // n_channels
        unbiased_var = var * n / (n - 1)
        if new_rm is not None:
            new_rm = (1.0 - factor) * new_rm + factor * mean
            new_rv = (1.0 - factor) * new_rv + factor * unbiased_var
    else:
        mean = np.asarray(running_mean, dtype=np.float64).copy()
        var = np.asarray(running_var, dtype=np.float64).copy()
    invstd = 1.0 / np.sqrt(var + eps)

    output = np.zeros(x.shape)
    for c in range(n_channels):
        xc = np.asarray(x[:, c], dtype=np.float64)
        output[:, c] = (xc - mean[c]) * invstd[c] * w[c] + b[c]
    return ForwardResult(output, mean, invstd, new_rm, new_rv, new_count)


def backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    weight: np.ndarray | None = None,
    batch_stats: bool = True,
) -> BackwardResult:
    """Gradients of ``forward`` w.r.t. input, weight and bias, float64.

    ``batch_stats=True`` (training): the statistics depend on ``x``, so
    ``dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``.
    ``batch_stats=False`` (evaluation): ``dx = dy * w * invstd``.
    In both cases ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)``.
    """
    n_channels = x.shape[1]
    w = _vector(weight, 1.0, n_channels)
    grad_input = np.zeros(x.shape)
    grad_weight = np.zeros(n_channels)
    grad_bias = np.zeros(n_channels)
    for c in range(n_channels):
        xc = np.asarray(x[:, c], dtype=np.float64)
        dyc = np.asarray(grad_output[:, c], dtype=np.float64)
        if xc.size == 0:
            continue
        xhat = (xc - mean[c]) * invstd[c]
        grad_weight[c] = (dyc * xhat).sum()
        grad_bias[c] = dyc.sum()
        if batch_stats:
            m = xc.size
            mean_dy = dyc.sum() / m
            mean_dy_xhat = (dyc * xhat).sum() / m
            grad_input[:, c] = w[c] * invstd[c] * (dyc - mean_dy - xhat * mean_dy_xhat)
        else:
            grad_input[:, c] = dyc * w[c] * invstd[c]
    return BackwardResult(grad_input, grad_weight, grad_bias)


class ReferenceBatchNorm:
    """A stateful reference module: parameters, running stats, counter, grads.

    Mirrors ``torch.nn.BatchNorm*d`` step by step, in float64.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bias: bool = True,
    ) -> None:
        self.eps = eps
        self.momentum = momentum
        self.training = True
        self.weight = np.ones(num_features) if affine else None
        self.bias = np.zeros(num_features) if affine and bias else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = None
        self.grad_bias = None
        self._last = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        tracking = self.training and self.running_mean is not None
        batch_stats = self.training or self.running_mean is None
        result = forward(
            x,
            self.weight,
            self.bias,
            self.running_mean if tracking or not batch_stats else None,
            self.running_var if tracking or not batch_stats else None,
            training=batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
        )
        if tracking:
            self.running_mean = result.running_mean
            self.running_var = result.running_var
            self.num_batches_tracked = result.num_batches_tracked
        self._last = (x, result.mean, result.invstd, batch_stats)
        return result.output

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        x, mean, invstd, batch_stats = self._last
        grads = backward(grad_output, x, mean, invstd, self.weight, batch_stats)
        if self.weight is not None:
            self.grad_weight = (
                grads.grad_weight
                if self.grad_weight is None
                else self.grad_weight + grads.grad_weight
            )
        if self.bias is not None:
            self.grad_bias = (
                grads.grad_bias if self.grad_bias is None else self.grad_bias + grads.grad_bias
            )
        return grads.grad_input
