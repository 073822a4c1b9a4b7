"""The shapes the benchmark measures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import numbabn as nbn

_MODULES = {2: nbn.BatchNorm1d, 3: nbn.BatchNorm1d, 4: nbn.BatchNorm2d, 5: nbn.BatchNorm3d}


def module_for(ndim: int) -> type:
    """The batch-norm module class that takes input of ``ndim`` axes."""
    return _MODULES[ndim]


def dtype_named(name: str) -> np.dtype:
    """The NumPy dtype ``name``; ``"bfloat16"`` is ``ml_dtypes``' (imported only for it)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def module_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the modules measured on ``dtype`` data: float32 for 16-bit floats (mixed
    precision, as PyTorch's autocast keeps batch norm's state), else ``dtype``."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


@dataclass(frozen=True)
class Case:
    """One input: shape, dtype and memory layout."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    channels_last: bool = False

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        layout = " CL" if self.channels_last else ""
        return f"{dims} {self.dtype}{layout}"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * dtype_named(self.dtype).itemsize

    def make(self, seed: int = 0) -> np.ndarray:
        """Seeded input with per-channel offsets, laid out as the case says."""
        rng = np.random.default_rng(seed)
        shape = self.shape
        if self.channels_last:
            order = (0, *range(2, len(shape)), 1)
            stored = rng.standard_normal([shape[axis] for axis in order], dtype=np.float32)
            x = stored.astype(dtype_named(self.dtype), copy=False).transpose(np.argsort(order))
        else:
            x = rng.standard_normal(shape, dtype=np.float32).astype(dtype_named(self.dtype))
        offsets = np.arange(shape[1], dtype=x.dtype).reshape((1, -1) + (1,) * (len(shape) - 2))
        x += offsets
        return x


# ResNet-50's batch-norm inputs at batch 32 (NCHW), then the issue's extra shapes.
RESNET50 = [
    (32, 64, 112, 112),
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 128, 28, 28),
    (32, 512, 28, 28),
    (32, 256, 14, 14),
    (32, 1024, 14, 14),
    (32, 512, 7, 7),
    (32, 2048, 7, 7),
]

# 16-bit float rows beside float32 on large shapes (25 MB and more in float32).
HALF_SHAPES = [(32, 64, 112, 112), (32, 64, 56, 56)]

DEFAULT_CASES = [
    *(
        case
        for shape in RESNET50
        for case in (
            Case(shape),
            *(Case(shape, half) for half in ("bfloat16", "float16") if shape in HALF_SHAPES),
        )
    ),
    Case((64, 256, 14, 14)),
    Case((256, 2048, 7, 7)),
    Case((8, 3, 224, 224)),
    Case((32, 64, 56, 56), channels_last=True),
    Case((32, 64, 56, 56), "float64"),
    Case((64, 256, 14, 14), "float64"),
    Case((2, 16, 8, 8)),
]

QUICK_CASES = [
    Case((32, 64, 56, 56)),
    Case((32, 64, 56, 56), "bfloat16"),
    Case((32, 64, 56, 56), channels_last=True),
    Case((2, 16, 8, 8)),
]
