"""CPU backend: Numba ``@njit(parallel=True)`` kernels."""

from numbabn._cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
