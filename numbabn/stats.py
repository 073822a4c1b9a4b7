"""Mergeable per-channel statistics: exact mean and variance over many batches."""

from __future__ import annotations

from typing import Any

import numpy as np

from numbabn import _validation as check
from numbabn._dispatch import backend_for, host_backend

__all__ = ["ChannelStats", "set_running_stats"]


class ChannelStats:
    """Count, mean and sum of squared deviations (M2) of each channel.

    Statistics of several batches, or of several processes, merge exactly with
    Chan et al.'s formulas, whatever the chunk sizes: the result is that of one
    pass over all the data (up to float64 rounding).

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.

    Examples
    --------
    >>> stats = ChannelStats(64)
    >>> for batch in batches:                          # doctest: +SKIP
    ...     stats.update(batch)
    >>> set_running_stats(bn, stats)                   # doctest: +SKIP
    """

    def __init__(self, num_features: int) -> None:
        self.count = 0
        self.mean = np.zeros(num_features)
        self.m2 = np.zeros(num_features)

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    @property
    def var(self) -> np.ndarray:
        """Biased variance (divide by the count), what batch norm normalises with."""
        return self.m2 / self.count if self.count else np.full(self.num_features, np.nan)

    @property
    def unbiased_var(self) -> np.ndarray:
        """Unbiased variance (divide by count - 1), what running statistics hold."""
        if self.count < 2:
            return np.full(self.num_features, np.nan)
        return self.m2 / (self.count - 1)

    def update(self, x: Any) -> ChannelStats:
        """Add a batch of shape ``(N, C, *spatial)``, a host or CUDA array; return self."""
        backend = backend_for(x=x)
        x = backend.adopt(x)
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
        check.check_dtype(x, backend.param_dtypes)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input size {x.shape}")
        if x.size == 0:
            return self
        with backend.on_stream(None, x):
            mean, m2 = backend.moments(x)
        return self._merge_moments(x.size // x.shape[1], mean, m2)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Add the statistics of ``other`` (e.g. another process's); return self."""
        if other.num_features != self.num_features:
            raise ValueError(
                f"cannot merge statistics of {other.num_features} channels into {self.num_features}"
            )
        return self._merge_moments(other.count, other.mean, other.m2)

    def _merge_moments(self, count: int, mean: np.ndarray, m2: np.ndarray) -> ChannelStats:
        """Add ``count`` values per channel with these means and M2 (Chan et al.).

        A channel where either mean is not finite (data with NaN or infinities)
        gets PyTorch's statistics of the whole data: the count-weighted mean
        (+-inf, or NaN for NaN or infinities of both signs) and an M2 of NaN.
        """
        if count:
            self.mean, self.m2 = host_backend().merge_moments(
                self.count, self.mean, self.m2, count, mean, m2
            )
            self.count += count
        return self

    @staticmethod
    def row(count: int, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
        """Statistics as one float64 row ``[count, mean (C values), M2 (C values)]``."""
        return np.concatenate([[count], mean, m2])

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> ChannelStats:
        """Statistics of rows made by :meth:`row` (one per rank or chunk), merged in row
        order: the same rows in the same order give the same bits."""
        count, mean, m2 = host_backend().merge_rows(rows)
        stats = cls(mean.shape[0])
        stats.count, stats.mean, stats.m2 = int(count), mean, m2
        return stats

    def to_dict(self) -> dict[str, Any]:
        """A plain, picklable form: ``{"count": int, "mean": ndarray, "m2": ndarray}``."""
        return {"count": self.count, "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ChannelStats:
        """Rebuild statistics saved with :meth:`to_dict`."""
        mean = np.asarray(state["mean"], dtype=np.float64)
        stats = cls(mean.shape[0])
        stats.count = int(state["count"])
        stats.mean = mean.copy()
        stats.m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        return stats

    def __repr__(self) -> str:
        return f"ChannelStats(num_features={self.num_features}, count={self.count})"


def set_running_stats(module: Any, stats: ChannelStats) -> None:
    """Set a module's running statistics to the exact ones in ``stats`` ("precise BN").

    ``running_mean`` becomes the mean and ``running_var`` the unbiased variance;
    ``num_batches_tracked`` is left as it is.
    """
    if module.running_mean is None:
        raise ValueError("the module does not track running statistics")
    if stats.count < 2:
        raise ValueError("need statistics of at least 2 values per channel")
    if stats.num_features != module.running_mean.shape[0]:
        raise ValueError(
            f"statistics are for {stats.num_features} channels, the module has "
            f"{module.running_mean.shape[0]}"
        )
    module.running_mean[...] = stats.mean
    module.running_var[...] = stats.unbiased_var
