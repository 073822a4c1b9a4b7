"""The CUDA backend: Numba ``@cuda.jit`` kernels over device arrays (numba-cuda)."""

from numbabn._cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
