"""Pick the backend that serves a call from the arrays it is handed."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from numbabn._cpu import CpuBackend
from numbabn.epilogue import Epilogue


class Backend(Protocol):
    """What a backend provides (see :class:`CpuBackend` and ``CudaBackend``).

    Batch norm in training is four phases: per-chunk sums, a merge of them in a
    fixed order, per-channel coefficients, an elementwise pass; backward is the
    same two passes with its own sums and coefficients. A backend offers each
    phase (:meth:`moments`, :meth:`train_coefficients`, :meth:`affine`;
    :meth:`grad_sums`, :meth:`grad_input_from_sums`) for callers that exchange
    statistics between them (``SyncBatchNorm`` over MPI, ``numbabn.dask``), and
    fused fast paths of the same phases for one array in one process
    (:meth:`train_forward`, :meth:`train_backward`, ...). The per-channel
    arithmetic between the phases is :mod:`numbabn._coefficients`, shared by
    both backends.

    Arrays are the backend's own kind after :meth:`adopt`. A call's work runs
    inside :meth:`on_stream` (the stream given, else the input's, after the
    other arrays' producers; the CPU backend has none). Per-channel
    statistics are float64 vectors: the fast paths keep them on the backend's
    device, the phases take and give NumPy vectors (what crosses an exchange).
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
    def on_stream(
        self, stream: Any | None, x: Any, others: tuple[Any, ...] = ()
    ) -> AbstractContextManager[None]: ...

    # -- the phases --------------------------------------------------------------
    def moments(self, x: Any) -> tuple[np.ndarray, np.ndarray]: ...
    def train_coefficients(
        self, mean: np.ndarray, m2: np.ndarray, count: int, weight: Any, bias: Any, eps: float,
        running_mean: Any | None, running_var: Any | None, momentum: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...  # fmt: skip
    def eval_coefficients(
        self, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
    def affine(
        self, x: Any, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: Any | None,
        epilogue: Epilogue | None = None,
    ) -> Any: ...  # fmt: skip
    def grad_sums(self, dy: Any, x: Any, mean: np.ndarray) -> np.ndarray: ...
    def grad_input_from_sums(
        self, dy: Any, x: Any, mean: np.ndarray, invstd: np.ndarray, weight: Any,
        sums: np.ndarray, count: int, out: Any | None,
    ) -> Any: ...  # fmt: skip

    # -- the fused fast paths ---------------------------------------------------
    def train_forward(
        self, x: Any, weight: Any, bias: Any, running_mean: Any | None, running_var: Any | None,
        momentum: float, eps: float, out: Any | None, epilogue: Epilogue | None = None,
    ) -> tuple[Any, Any, Any]: ...  # fmt: skip
    def eval_forward(
        self, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: float,
        out: Any | None, epilogue: Epilogue | None = None,
    ) -> tuple[Any, Any, Any]: ...  # fmt: skip
    def train_backward(
        self, dy: Any, x: Any, mean: Any, invstd: Any, weight: Any, out: Any | None
    ) -> tuple[Any, Any, Any]: ...
    def eval_backward(
        self, dy: Any, x: Any, mean: Any, invstd: Any, weight: Any | None, out: Any | None
    ) -> tuple[Any, Any | None, Any | None]: ...
    def masked_backward(
        self, dy: Any, x: Any, mean: Any, invstd: Any, weight: Any, bias: Any,
        batch_stats: bool, epilogue: Epilogue, out: Any | None,
    ) -> tuple[Any, Any | None, Any, Any]: ...  # fmt: skip


_DLPACK_CPU = 1  # kDLCPU, DLPack's device type of host memory

ACCEPTED = (
    "a NumPy array, another CPU array (one exporting DLPack or the NumPy array interface: "
    "a PyTorch CPU tensor, a JAX CPU array, a numpy.memmap) or a CUDA array"
)


def host_view(array: Any) -> Any:
    """A host array of any library as a NumPy array over the same memory (None stays None).

    Plain ndarrays come back as they are; ndarray subclasses (``numpy.memmap``)
    as plain ndarray views; other arrays through DLPack or the NumPy array
    interface, never copied. A read-only export (a JAX array) gives a
    read-only view, which serves as an input but not as ``out=``.

    Raises
    ------
    TypeError
        For masked arrays (the kernels would ignore the mask) and PyTorch
        tensors that require grad (they export nothing).
    """
    if array is None or type(array) is np.ndarray:
        return array
    if isinstance(array, np.ndarray):
        if isinstance(array, np.ma.MaskedArray):
            raise TypeError(
                "masked arrays are not supported: batch norm would ignore the mask; "
                "pass array.filled(value) or array.data"
            )
        return array.view(np.ndarray)
    if getattr(array, "requires_grad", False):
        raise TypeError(
            "a tensor that requires grad cannot be shared without a copy (it exports no "
            "DLPack); pass tensor.detach(): numbabn computes gradients in backward(), "
            "outside PyTorch's autograd"
        )
    if hasattr(array, "__dlpack__"):
        try:
            return np.from_dlpack(array)
        except BufferError as error:
            name = _type_name(array)
            raise TypeError(f"{name} cannot be viewed as a NumPy array: {error}") from None
    return np.asarray(array)  # the NumPy array interface: a view, not a copy


# Per array type: the function that wraps a NumPy array as that type, or None.
_IMPORTERS: dict[type, Callable[[np.ndarray], Any] | None] = {}


def host_like(result: np.ndarray, original: Any) -> Any:
    """``result`` as the kind of host array ``original`` is, without a copy.

    NumPy arrays and their subclasses give plain ndarrays. Other arrays are
    rebuilt through DLPack with their library's ``from_dlpack``: the array-API
    namespace's (``x.__array_namespace__()``, as JAX arrays have), else the
    top-level module's (``torch.from_dlpack``); an array that offers neither
    gives an ndarray.
    """
    if isinstance(original, np.ndarray):
        return result
    kind = type(original)
    if kind not in _IMPORTERS:
        _IMPORTERS[kind] = _importer(original)
    importer = _IMPORTERS[kind]
    return result if importer is None else importer(result)


def _importer(original: Any) -> Callable[[np.ndarray], Any] | None:
    if not hasattr(original, "__dlpack__"):
        return None
    if hasattr(original, "__array_namespace__"):
        return getattr(original.__array_namespace__(), "from_dlpack", None)
    module = sys.modules.get(type(original).__module__.partition(".")[0])
    return getattr(module, "from_dlpack", None)


class HostBackend(CpuBackend):
    """The CPU backend, taking host arrays of any library (see :func:`host_view`)."""

    adopt = staticmethod(host_view)
    like = staticmethod(host_like)


_CPU = HostBackend()


def is_device_array(array: object) -> bool:
    """Whether ``array`` lives on a CUDA device (or in Numba's CUDA simulator)."""
    return hasattr(array, "__cuda_array_interface__") or hasattr(array, "__cuda_ndarray__")


def is_dask_array(array: object) -> bool:
    """Whether ``array`` is a Dask array (checked without importing Dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(array, module.Array)


def _type_name(array: object) -> str:
    return f"{type(array).__module__}.{type(array).__qualname__}"


def _is_host_array(array: object) -> bool:
    """Whether ``array`` offers CPU memory through the NumPy array interface or DLPack."""
    if hasattr(array, "__array_interface__") or hasattr(array, "__array_struct__"):
        return True
    device = getattr(array, "__dlpack_device__", None)
    if device is None or not hasattr(array, "__dlpack__"):
        return False
    return int(device()[0]) == _DLPACK_CPU


def kind_of(array: object) -> str:
    """ "cpu" for host arrays (see :func:`host_view`), "cuda" for CUDA arrays.

    Raises
    ------
    TypeError
        For anything else, saying what is accepted.
    """
    if isinstance(array, np.ndarray):
        return "cpu"
    if is_device_array(array):
        return "cuda"
    if _is_host_array(array):
        return "cpu"
    hint = ""
    if isinstance(array, (list, tuple)):
        hint = "; convert it with numpy.asarray(x, dtype=numpy.float32)"
    elif hasattr(array, "__dlpack__"):
        hint = "; DLPack is taken for CPU memory (GPU arrays through __cuda_array_interface__)"
    raise TypeError(f"expected {ACCEPTED}, got {_type_name(array)}{hint}")


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


def device_index(device: str) -> int | None:
    """The GPU index of a device name: N for ``"cuda:N"``, None for ``"cpu"`` and ``"cuda"``."""
    kind, _, index = device.partition(":")
    return int(index) if kind == "cuda" and index else None


def backend_named(device: str) -> Backend:
    """The backend of a module placed on ``device`` ("cpu", "cuda" or "cuda:N").

    Raises
    ------
    ValueError
        For a CUDA device when no CUDA GPU can be used, or not that many.
    """
    if device == "cpu":
        return _CPU
    from numba import cuda

    backend = cuda_backend()
    if not cuda.is_available():
        raise ValueError(
            f"device {device!r} is not available: Numba finds no usable CUDA GPU "
            "(set NUMBA_ENABLE_CUDASIM=1 to run the CUDA kernels in Numba's simulator)"
        )
    index = device_index(device)
    count = len(cuda.gpus)
    if index is not None and index >= count:
        raise ValueError(
            f"device {device!r} is not available: Numba finds {count} CUDA GPU"
            f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})"
        )
    return backend


def array_kind(array: object) -> str | None:
    """:func:`kind_of`, or None for anything that is not an array."""
    try:
        return kind_of(array)
    except TypeError:
        return None


def all_host(arrays: tuple[object, ...]) -> bool:
    """Whether every entry is a plain NumPy array or None (the fast path: nothing to adopt)."""
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
            kind = kind_of(array)
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
