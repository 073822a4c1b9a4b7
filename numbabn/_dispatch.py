"""Pick the backend that serves a call from the arrays it is handed."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
import sys
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from numbabn._cpu import CpuBackend, is_host_array
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
    both backends. :meth:`plan_forward` may give, once per signature of a call and
    its per-channel arrays, a runner ``(x, momentum) -> (output, mean, invstd)``
    that serves the forwards of that signature faster than the fused passes (see
    ``numbabn.functional.ForwardPlan``); :meth:`plan_backward` likewise a runner
    ``(dy, x, mean, invstd) -> (dx, dweight, dbias)``.

    A module placed on a backend keeps its state on :meth:`device_for` its
    index (a GPU, or None on the host) and runs there inside :meth:`on_device`;
    :meth:`device_of` tells an array's device. Inside :meth:`one_thread` the
    calls of this thread run their kernels on it alone (Dask's tasks, which are
    the parallelism themselves).

    Arrays are the backend's own kind after :meth:`adopt`. A call's work runs
    inside :meth:`on_stream` (the stream given, else the input's, after the
    other arrays' producers; the CPU backend has none). Per-channel
    statistics are float64 vectors: the fast paths keep them on the backend's
    device, the phases take and give NumPy vectors (what crosses an exchange).
    """

    name: str
    #: The data dtypes the backend takes, each mapped to its parameters' dtype.
    param_dtypes: dict[np.dtype, np.dtype]

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

    # -- devices and threads ----------------------------------------------------
    def device_for(self, index: int | None) -> int | None: ...
    def on_device(self, device: int | None) -> AbstractContextManager[Any]: ...
    def device_of(self, array: Any) -> int | None: ...
    def one_thread(self) -> AbstractContextManager[Any]: ...

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
    def plan_forward(
        self, x: Any, weight: Any, bias: Any, running_mean: Any | None, running_var: Any | None,
        training: bool, eps: float, epilogue: Epilogue | None, out: Any | None = None,
    ) -> Any | None: ...  # fmt: skip
    def plan_backward(
        self, dy: Any, x: Any, weight: Any, batch_stats: bool, epilogue: Epilogue | None
    ) -> Any | None: ...
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


ACCEPTED = (
    "a NumPy array, another CPU array (one exporting DLPack or the NumPy array interface: "
    "a PyTorch CPU tensor, a JAX CPU array, a numpy.memmap) or a CUDA array"
)

_CPU = CpuBackend()


def is_device_array(array: object) -> bool:
    """Whether ``array`` lives on a CUDA device (or in Numba's CUDA simulator)."""
    return hasattr(array, "__cuda_array_interface__") or hasattr(array, "__cuda_ndarray__")


def is_dask_array(array: object) -> bool:
    """Whether ``array`` is a Dask array (checked without importing Dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(array, module.Array)


def _type_name(array: object) -> str:
    return f"{type(array).__module__}.{type(array).__qualname__}"


def kind_of(array: object) -> str:
    """ "cpu" for host arrays (NumPy's, or DLPack or array-interface exporters on the CPU),
    "cuda" for CUDA arrays.

    Raises
    ------
    TypeError
        For anything else, saying what is accepted.
    """
    if isinstance(array, np.ndarray):
        return "cpu"
    if is_device_array(array):
        return "cuda"
    if is_host_array(array):
        return "cpu"
    hint = ""
    if isinstance(array, (list, tuple)):
        hint = "; convert it with numpy.asarray(x, dtype=numpy.float32)"
    elif hasattr(array, "__dlpack__"):
        hint = "; DLPack is taken for CPU memory (GPU arrays through __cuda_array_interface__)"
    raise TypeError(f"expected {ACCEPTED}, got {_type_name(array)}{hint}")


# The oldest releases the CUDA backend works with, as pyproject.toml's [cuda] extra and
# dependencies name them: numba-cuda 0.20 is the first with numba.cuda.core (its
# configuration), which the backend imports; launch_bounds= (0.14) and forceinline= (0.11)
# came before. numba-cuda itself needs numba 0.60.
CUDA_REQUIREMENTS = {"numba": "0.60", "numba-cuda": "0.20"}


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"0.30.4rc1"`` -> ``(0, 30, 4)``."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_cuda_requirements() -> None:
    """Raise ImportError naming the releases needed when numba or numba-cuda is older."""
    older = []
    for package, minimum in CUDA_REQUIREMENTS.items():
        found = importlib.metadata.version(package)
        if _release(found) < _release(minimum):
            older.append(f"{package} {found} (numbabn needs {package} >= {minimum})")
    if older:
        raise ImportError(
            f"CUDA arrays need newer packages than these: {', '.join(older)}; "
            "pip install -U 'numba-cuda[cu12]' (numbabn's [cuda] extra)"
        )


@functools.cache
def cuda_backend() -> Backend:
    """The CUDA backend, imported on first use so the CPU install never needs numba-cuda."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError(
            "CUDA arrays need the numba-cuda package: pip install 'numba-cuda[cu12]' "
            "(numbabn's [cuda] extra)"
        )
    check_cuda_requirements()
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


def all_host(arrays: tuple[object, ...]) -> bool:
    """Whether every entry is a plain NumPy array or None (the fast path: nothing to adopt)."""
    return all(type(array) is np.ndarray or array is None for array in arrays)


class HostBackend(Backend, Protocol):
    """The backend of host arrays, which also serves what is on the host whatever the data's
    device: merges of exchanged per-channel statistics (float64 NumPy vectors, Chan et al.)
    and the kernel cache."""

    def merge_moments(
        self, count_a: int, mean_a: np.ndarray, m2_a: np.ndarray,
        count_b: int, mean_b: np.ndarray, m2_b: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]: ...  # fmt: skip
    def merge_rows(self, rows: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]: ...
    def compile_counts(self) -> tuple[int, int]: ...
    def cache_dir(self) -> str: ...


def host_backend() -> HostBackend:
    """The CPU backend."""
    return _CPU


def host_values(value: Any) -> np.ndarray:
    """The values of an array of any backend as a NumPy array (device arrays are copied to
    the host; anything else is what ``numpy.asarray`` makes of it)."""
    if is_device_array(value):
        backend = cuda_backend()
        return backend.to_host(backend.adopt(value))
    return np.asarray(value)


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
