"""Checks shared by the functional API and the modules, with PyTorch's error texts."""

from __future__ import annotations

import math

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(x: np.ndarray, name: str = "input") -> None:
    """Raise TypeError unless ``x`` is float32 or float64."""
    if x.dtype not in SUPPORTED_DTYPES:
        hint = " (float16 runs on the CUDA backend only)" if x.dtype == np.float16 else ""
        raise TypeError(f"{name} has dtype {x.dtype}; numbabn supports float32 and float64{hint}")


def check_ndim(x: np.ndarray, allowed: tuple[int, ...], label: str) -> None:
    """Raise PyTorch's ``expected 4D input (got 3D input)`` unless ``x.ndim`` is allowed."""
    if x.ndim not in allowed:
        raise ValueError(f"expected {label} input (got {x.ndim}D input)")


def check_batch_size(x: np.ndarray) -> None:
    """Raise PyTorch's error when training would see one value per channel."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def check_channel_vector(name: str, vector: np.ndarray | None, x: np.ndarray) -> None:
    """Check a per-channel vector (weight, bias, running statistics) against ``x``."""
    if vector is None:
        return
    n_channels = x.shape[1]
    if vector.ndim != 1 or vector.shape[0] != n_channels:
        raise RuntimeError(f"{name} should contain {n_channels} elements not {vector.size}")
    if vector.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {vector.dtype} but the input has dtype {x.dtype}; they must match"
        )


def check_like(name: str, array: np.ndarray, x: np.ndarray, x_name: str = "input") -> None:
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


def check_out(out: np.ndarray | None, x: np.ndarray) -> None:
    """Check an ``out=`` array: same shape and dtype as ``x``, writeable."""
    if out is None:
        return
    check_like("out", out, x)
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
