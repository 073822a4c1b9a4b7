"""Pick the backend that serves a call from the arrays it is handed."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Protocol

import numpy as np

from numbabn._cpu import CpuBackend


class Backend(Protocol):
    """What a backend provides (see :class:`CpuBackend` and ``CudaBackend``).

    Arrays are the backend's own kind after :meth:`adopt`; per-channel
    statistics are float64 vectors of that kind.
    """

    name: str

    def adopt(self, array: Any) -> Any: ...
    def like(self, result: Any, original: Any) -> Any: ...
    def empty_like(self, x: Any) -> Any: ...
    def filled(self, value: float, n: int, dtype: np.dtype) -> Any: ...
    def from_host(self, array: np.ndarray) -> Any: ...
    def to_host(self, array: Any) -> np.ndarray: ...
    def assign(self, target: Any, values: np.ndarray | float) -> None: ...
    def may_share_memory(self, a: Any, b: Any) -> bool: ...
    def accumulate(self, target: Any, source: Any) -> None: ...
    def train_forward(
        self, x, weight, bias, running_mean, running_var, momentum, eps, out, epilogue=None
    ): ...
    def eval_forward(self, x, running_mean, running_var, weight, bias, eps, out, epilogue=None): ...
    def train_backward(self, dy, x, mean, invstd, weight, out): ...
    def eval_backward(self, dy, x, mean, invstd, weight, out): ...
    def masked_backward(self, dy, x, mean, invstd, weight, bias, batch_stats, epilogue, out): ...


# SyncBatchNorm and ChannelStats also use the CPU backend's moments, affine,
# grad_sums and grad_input_from_sums: the passes of a statistics exchange.


_CPU = CpuBackend()


def is_device_array(array: object) -> bool:
    """Whether ``array`` lives on a CUDA device (or in Numba's CUDA simulator)."""
    return hasattr(array, "__cuda_array_interface__") or hasattr(array, "__cuda_ndarray__")


def _kind(array: object) -> str:
    if isinstance(array, np.ndarray):
        return "cpu"
    if is_device_array(array):
        return "cuda"
    raise TypeError(
        f"expected a NumPy array or a CUDA array, got "
        f"{type(array).__module__}.{type(array).__qualname__}"
    )


@functools.cache
def cuda_backend() -> Backend:
    """The CUDA backend, imported on first use so the CPU install never needs numba-cuda."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError(
            "CUDA arrays need the numba-cuda package; install numbabn with the cuda extra "
            "(pip install 'numbabn[cuda]')"
        )
    from numbabn._cuda import CudaBackend

    return CudaBackend()


def backend_named(device: str) -> Backend:
    """The backend of a module placed on ``device`` ("cpu" or "cuda").

    Raises
    ------
    ValueError
        For ``"cuda"`` when no CUDA GPU can be used.
    """
    if device == "cpu":
        return _CPU
    from numba import cuda

    backend = cuda_backend()
    if not cuda.is_available():
        raise ValueError(
            "device 'cuda' is not available: Numba finds no usable CUDA GPU "
            "(set NUMBA_ENABLE_CUDASIM=1 to run the CUDA kernels in Numba's simulator)"
        )
    return backend


def array_kind(array: object) -> str | None:
    """ "cpu" for NumPy arrays, "cuda" for CUDA arrays, None for anything else."""
    try:
        return _kind(array)
    except TypeError:
        return None


def all_host(arrays: tuple[object, ...]) -> bool:
    """Whether every entry is a NumPy array or None."""
    return all(type(array) is np.ndarray or array is None for array in arrays)


def host_backend() -> Backend:
    """The CPU backend."""
    return _CPU


def backend_for(**arrays: object) -> Backend:
    """Return the backend for the given named arrays (None entries are ignored).

    Raises
    ------
    TypeError
        If an array is of no supported kind, or host and device arrays are mixed.
    """
    if all_host(tuple(arrays.values())):
        return _CPU
    chosen: tuple[str, str] | None = None
    for name, array in arrays.items():
        if array is None:
            continue
        try:
            kind = _kind(array)
        except TypeError as error:
            raise TypeError(f"{name}: {error}") from None
        if chosen is None:
            chosen = (name, kind)
        elif kind != chosen[1]:
            raise TypeError(
                f"{chosen[0]} is a {chosen[1]} array but {name} is a {kind} array; "
                "all arrays of one call must be on the same device"
            )
    if chosen is not None and chosen[1] == "cuda":
        return cuda_backend()
    return _CPU
