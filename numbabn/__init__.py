"""numbabn: PyTorch's batch normalization for NumPy, on Numba kernels.

Modules (``BatchNorm1d/2d/3d`` and their lazy variants) hold the state; the
stateless functions live in :mod:`numbabn.functional`.
"""

from numbabn import functional
from numbabn.functional import SavedStats
from numbabn.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    IncompatibleKeys,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "IncompatibleKeys",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SavedStats",
    "functional",
]
