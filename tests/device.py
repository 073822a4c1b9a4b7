"""Device arrays for the tests: exact-stride copies to the GPU (or the simulator) and back.

Import only after ``pytest.importorskip("numba_cuda")``; a module that imports
this is skipped when neither a GPU nor the simulator is there.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from numba import cuda

from numbabn._cuda import arrays

if not cuda.is_available():
    pytest.skip("no CUDA GPU and the simulator is off", allow_module_level=True)

SIMULATOR = arrays.SIMULATOR


def to_device(x: np.ndarray):
    """A device copy of ``x`` with exactly its strides (its memory span is copied)."""
    if x.size == 0:
        return cuda.to_device(np.ascontiguousarray(x))
    itemsize = x.dtype.itemsize
    low = sum(min(0, (n - 1) * s) for n, s in zip(x.shape, x.strides, strict=True))
    high = sum(max(0, (n - 1) * s) for n, s in zip(x.shape, x.strides, strict=True)) + itemsize
    start = x.__array_interface__["data"][0] + low
    span = np.frombuffer((ctypes.c_char * (high - low)).from_address(start), np.uint8).copy()
    device = cuda.to_device(span)
    if SIMULATOR:
        view = np.ndarray(x.shape, x.dtype, buffer=device._ary, offset=-low, strides=x.strides)
        return type(device)(view)
    gpu_data = device.gpu_data.view(-low)
    return cuda.devicearray.DeviceNDArray(x.shape, x.strides, x.dtype, gpu_data=gpu_data)


def host(array) -> np.ndarray | None:
    """A host copy of a device array (None stays None)."""
    return None if array is None else arrays.to_host(array)
