"""CPU backend: Numba `@njit` kernels over shape-determined work items on Numba's threads."""

from numbabn._cpu.backend import CpuBackend
from numbabn._cpu.host_arrays import is_host_array

__all__ = ["CpuBackend", "is_host_array"]
