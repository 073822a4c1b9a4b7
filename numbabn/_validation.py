"""Checks shared by the functional API and the modules, with PyTorch's error texts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = np.dtype(np.float16)
# Input dtype -> parameter dtype: float16 input keeps float32 parameters and statistics.
_PARAM_DTYPES = {dtype: dtype for dtype in SUPPORTED_DTYPES} | {_HALF: np.dtype(np.float32)}


def param_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of the parameters and statistics for input of ``dtype`` (float32 for float16)."""
    return _PARAM_DTYPES[dtype]


def check_dtype(x: Any, backend: str = "cpu") -> None:
    """Raise TypeError unless ``x`` is float32 or float64 (or float16 on CUDA)."""
    dtype = x.dtype
    if dtype in _PARAM_DTYPES and (dtype != _HALF or backend == "cuda"):
        return
    if x.dtype == _HALF:
        raise TypeError(
            "input has dtype float16, which the CPU backend does not take: Numba's CPU "
            "target has no float16 arithmetic, so it could not be faster than converting. "
            "Convert with x.astype(np.float32), or pass a CUDA array for float16 on the GPU"
        )
    supported = "float32 and float64" + (" (and float16)" if backend == "cuda" else "")
    raise TypeError(f"input has dtype {x.dtype}; numbabn supports {supported}")


def check_ndim(x: Any, allowed: tuple[int, ...], label: str) -> None:
    """Raise PyTorch's ``expected 4D input (got 3D input)`` unless ``x.ndim`` is allowed."""
    if x.ndim not in allowed:
        raise ValueError(f"expected {label} input (got {x.ndim}D input)")


def check_batch_size(x: Any) -> None:
    """Raise PyTorch's error when training would see one value per channel."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def check_channel_vector(name: str, vector: Any | None, x: Any) -> None:
    """Check a per-channel vector (weight, bias, running statistics) against ``x``."""
    if vector is None:
        return
    n_channels = x.shape[1]
    if vector.shape != (n_channels,):
        raise RuntimeError(f"{name} should contain {n_channels} elements not {vector.size}")
    expected = _PARAM_DTYPES.get(x.dtype)
    if vector.dtype != expected:
        raise TypeError(
            f"{name} has dtype {vector.dtype} but the input has dtype {x.dtype}; "
            f"{name} must be {expected}"
        )


def check_like(name: str, array: Any, x: Any, x_name: str = "input") -> None:
    """Check that ``array`` has the shape and dtype of ``x``."""
    if array.shape != x.shape:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)} but {x_name} has shape {tuple(x.shape)}; "
            "they must match"
        )
    if array.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {array.dtype} but {x_name} has dtype {x.dtype}; they must match"
        )


def check_out(out: Any | None, x: Any) -> None:
    """Check an ``out=`` array: same shape and dtype as ``x``, writeable."""
    if out is None:
        return
    check_like("out", out, x)
    check_writeable("out", out)


def check_writeable(name: str, array: Any, why: str = "") -> None:
    """Raise ValueError if ``array`` is a read-only NumPy array (``why`` says who writes it)."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        raise ValueError(f"{name} is read-only{why}; pass a writeable array")
