"""Pick the backend that serves a call from the arrays it is handed."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from numbabn._cpu import CpuBackend


class Backend(Protocol):
    """The passes over the data that a backend provides (see :class:`CpuBackend`)."""

    name: str

    def train_forward(self, x, weight, bias, running_mean, running_var, momentum, eps, out): ...
    def moments(self, x): ...
    def affine(self, x, mean, scale, shift, out): ...
    def grad_sums(self, dy, x, mean): ...
    def grad_input_from_sums(self, dy, x, mean, invstd, weight, sums, count, out): ...
    def train_backward(self, dy, x, mean, invstd, weight, out): ...


_CPU = CpuBackend()


def _backend_name(array: object) -> str:
    if isinstance(array, np.ndarray):
        return "cpu"
    if hasattr(array, "__cuda_array_interface__"):
        return "cuda"
    raise TypeError(
        f"expected a NumPy array, got {type(array).__module__}.{type(array).__qualname__}"
    )


def backend_for(**arrays: object) -> Backend:
    """Return the backend for the given named arrays (None entries are ignored).

    Raises
    ------
    TypeError
        If an array is of no supported kind, or host and device arrays are mixed.
    """
    if all(type(array) is np.ndarray or array is None for array in arrays.values()):
        return _CPU
    chosen: tuple[str, str] | None = None
    for name, array in arrays.items():
        if array is None:
            continue
        try:
            kind = _backend_name(array)
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
        raise TypeError(
            f"{chosen[0]} is a CUDA array, and this build of numbabn has no CUDA backend; "
            "pass NumPy arrays"
        )
    return _CPU
