"""numbabn: PyTorch's batch normalization for NumPy, on Numba kernels.

Modules (``BatchNorm1d/2d/3d`` and their lazy variants) hold the state; the
stateless functions live in :mod:`numbabn.functional`. ``SyncBatchNorm`` shares
batch statistics across MPI ranks; ``ChannelStats`` merges statistics exactly.
``KernelCacheWarning`` says once per process that compiled kernels could not be
saved on disk (they are compiled in memory instead).
"""

from numbabn import functional
from numbabn._source_stamp import KernelCacheWarning
from numbabn.distributed import SyncBatchNorm
from numbabn.folding import fold_into_conv, fold_into_linear
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
from numbabn.stats import ChannelStats, set_running_stats

# The one definition of the version: pyproject.toml reads it, CHANGELOG.md records it.
__version__ = "0.2.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ChannelStats",
    "IncompatibleKeys",
    "KernelCacheWarning",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SavedStats",
    "SyncBatchNorm",
    "fold_into_conv",
    "fold_into_linear",
    "functional",
    "set_running_stats",
]
