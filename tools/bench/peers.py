"""What numbabn is measured against: a roofline, plain NumPy, and PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit, prange

if TYPE_CHECKING:
    import torch


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _read_pass(flat: np.ndarray) -> float:
    total = 0.0
    for i in prange(flat.shape[0]):
        total += flat[i]
    return total


@njit(parallel=True, cache=True)
def _read_write_pass(flat: np.ndarray, out: np.ndarray) -> None:
    for i in prange(flat.shape[0]):
        out[i] = 2 * flat[i] + 1


class Roofline:
    """A streaming read pass and a read+write pass over the bytes of ``x``.

    16-bit floats are passed over as 16-bit integers (the same bytes: Numba has
    no 16-bit float type).
    """

    def __init__(self, x: np.ndarray) -> None:
        self.flat = np.ravel(x, order="K")
        if self.flat.itemsize == 2:
            self.flat = self.flat.view(np.uint16)
        self.out = np.empty_like(self.flat)
        self.read()
        self.read_write()

    def read(self) -> None:
        _read_pass(self.flat)

    def read_write(self) -> None:
        _read_write_pass(self.flat, self.out)


def _reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _per_channel(vector: np.ndarray, ndim: int) -> np.ndarray:
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


class NumpyBatchNorm:
    """Training-mode batch norm as a NumPy user writes it by hand."""

    def __init__(self, x: np.ndarray, eps: float = 1e-5) -> None:
        self.eps = eps
        self.weight = np.ones(x.shape[1], x.dtype)
        self.bias = np.zeros(x.shape[1], x.dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        axes = _reduce_axes(x)
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        self.x, self.mean, self.invstd = x, mean, 1.0 / np.sqrt(var + self.eps)
        xhat = (x - mean) * self.invstd
        return xhat * _per_channel(self.weight, x.ndim) + _per_channel(self.bias, x.ndim)

    def eval_forward(self, x: np.ndarray) -> np.ndarray:
        scale = _per_channel(self.weight, x.ndim) / np.sqrt(1.0 + self.eps)
        return x * scale + _per_channel(self.bias, x.ndim)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        axes = _reduce_axes(dy)
        xhat = (self.x - self.mean) * self.invstd
        mean_dy = dy.mean(axis=axes, keepdims=True)
        mean_dy_xhat = (dy * xhat).mean(axis=axes, keepdims=True)
        self.grad_weight = (dy * xhat).sum(axis=axes)
        self.grad_bias = dy.sum(axis=axes)
        scale = _per_channel(self.weight, dy.ndim) * self.invstd
        return scale * (dy - mean_dy - xhat * mean_dy_xhat)


class TorchBatchNorm:
    """PyTorch's CPU batch norm (``torch.nn.functional.batch_norm``) on the same data."""

    def __init__(self, x: np.ndarray, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        channels = x.shape[1]
        # Float32 parameters for 16-bit data, as in measure_case.
        dtype = torch.float64 if x.dtype == np.float64 else torch.float32
        if x.dtype.name == "bfloat16":  # NumPy's bfloat16 has no DLPack: share the bits
            self.x = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        else:
            self.x = torch.from_numpy(x)
        self.x.requires_grad_(True)
        self.weight = torch.ones(channels, dtype=dtype, requires_grad=True)
        self.bias = torch.zeros(channels, dtype=dtype, requires_grad=True)
        self.running_mean = torch.zeros(channels, dtype=dtype)
        self.running_var = torch.ones(channels, dtype=dtype)
        self.dy = torch.ones_like(self.x)

    def _batch_norm(self, training: bool) -> torch.Tensor:
        return self.torch.nn.functional.batch_norm(
            self.x, self.running_mean, self.running_var, self.weight, self.bias, training
        )

    def forward(self) -> None:
        with self.torch.no_grad():
            self._batch_norm(True)

    def eval_forward(self) -> None:
        with self.torch.no_grad():
            self._batch_norm(False)

    def prepare_backward(self) -> None:
        self.y = self._batch_norm(True)

    def backward(self) -> None:
        self.torch.autograd.grad(
            self.y, (self.x, self.weight, self.bias), self.dy, retain_graph=True
        )

    def forward_backward(self) -> None:
        y = self._batch_norm(True)
        self.torch.autograd.grad(y, (self.x, self.weight, self.bias), self.dy)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
