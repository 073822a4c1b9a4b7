"""CPU backend: Numba `@njit` kernels over shape-determined work items on Numba's threads."""

from numbabn._cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
