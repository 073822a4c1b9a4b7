"""Host arrays of any library: taken in as NumPy views, handed back as the caller's kind.

A NumPy array is used as it is; an ndarray subclass (``numpy.memmap``) as a plain
ndarray view; any other array exporting DLPack or the NumPy array interface on
the CPU (a PyTorch CPU tensor, a JAX CPU array) as a NumPy view of its memory,
never a copy. Results go back as the kind of array the caller passed in.

bfloat16 goes through DLPack as 16-bit integers viewed back on either side
(NumPy's DLPack knows no bfloat16): a PyTorch bfloat16 tensor is still shared,
not copied, both ways.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from numbabn._cpu.halves import bfloat16
from numbabn._validation import is_bfloat16

__all__ = ["adopt", "is_host_array", "like"]

_DLPACK_CPU = 1  # kDLCPU, DLPack's device type of host memory


def is_host_array(array: object) -> bool:
    """Whether ``array`` offers CPU memory through the NumPy array interface or DLPack."""
    if isinstance(array, np.ndarray):
        return True
    if hasattr(array, "__array_interface__") or hasattr(array, "__array_struct__"):
        return True
    device = getattr(array, "__dlpack_device__", None)
    if device is None or not hasattr(array, "__dlpack__"):
        return False
    return int(device()[0]) == _DLPACK_CPU


def adopt(array: Any) -> Any:
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
    if _is_bfloat16(array):
        return _bfloat16_view(array)
    if hasattr(array, "__dlpack__"):
        try:
            return np.from_dlpack(array)
        except BufferError as error:
            name = f"{type(array).__module__}.{type(array).__qualname__}"
            raise TypeError(f"{name} cannot be viewed as a NumPy array: {error}") from None
    return np.asarray(array)  # the NumPy array interface: a view, not a copy


# Per array type: the function that wraps a NumPy array as that type, or None.
_IMPORTERS: dict[type, Callable[[np.ndarray], Any] | None] = {}


def like(result: np.ndarray, original: Any) -> Any:
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
    if importer is None:
        return result
    if is_bfloat16(result.dtype) and _is_bfloat16(original):
        # DLPack has bfloat16, but NumPy exports none: the bits go, and are viewed back.
        return importer(result.view(np.int16)).view(original.dtype)
    return importer(result)


def _is_bfloat16(array: Any) -> bool:
    """Whether ``array``, another library's array, holds bfloat16 (``torch.bfloat16``)."""
    return str(getattr(array, "dtype", "")).endswith("bfloat16")


def _bfloat16_view(array: Any) -> np.ndarray:
    """Another library's bfloat16 array as a NumPy (``ml_dtypes``) bfloat16 view of its memory.

    NumPy's DLPack import has no bfloat16: an array that can view itself as its
    library's ``int16`` (a PyTorch tensor) goes as its bits, without a copy; any
    other goes through the NumPy array interface (JAX's exports ``ml_dtypes``' dtype).
    """
    int16 = getattr(sys.modules.get(type(array).__module__.partition(".")[0]), "int16", None)
    if int16 is not None and hasattr(array, "view") and hasattr(array, "__dlpack__"):
        return np.from_dlpack(array.view(int16)).view(bfloat16())
    return np.asarray(array)


def _importer(original: Any) -> Callable[[np.ndarray], Any] | None:
    if not hasattr(original, "__dlpack__"):
        return None
    if hasattr(original, "__array_namespace__"):
        return getattr(original.__array_namespace__(), "from_dlpack", None)
    module = sys.modules.get(type(original).__module__.partition(".")[0])
    return getattr(module, "from_dlpack", None)
