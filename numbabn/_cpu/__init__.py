"""CPU backend: serial Numba `@njit` kernels over shape-determined work items, on a thread pool."""

from numbabn._cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
