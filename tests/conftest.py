"""Shared fixtures and helpers: seeded data, inputs in many memory layouts, module state."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# The CUDA backend's tests run in Numba's CUDA simulator unless told otherwise
# (``make test-gpu`` sets NUMBA_ENABLE_CUDASIM=0); this must precede importing numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# ``reference`` is a sibling module of the tests, importable without a package.
sys.path.insert(0, str(Path(__file__).parent))

SEED = 20240607

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    _GENERATED = {
        "deadline": None,  # first calls compile kernels
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        "print_blob": True,
    }
    # make test: the same examples every run, within a fixed budget.
    settings.register_profile("ci", max_examples=60, derandomize=True, **_GENERATED)
    # make fuzz: fresh random examples, many more of them.
    settings.register_profile("fuzz", max_examples=4000, **_GENERATED)
    settings.load_profile(os.environ.get("NUMBABN_HYPOTHESIS_PROFILE", "ci"))

# Every way of laying out an input of a given logical shape that the tests try.
# Each entry maps a name to a builder ``(base_maker, shape) -> array`` where
# ``base_maker(shape)`` returns a fresh C-contiguous array of that shape.
LAYOUTS_ANY = ("contiguous", "fortran", "batch_slice", "channel_slice", "negative")
LAYOUTS_SPATIAL = (
    "channels_last",
    "inner_slice",
    "crop",
    "channels_last_slice",
    "channels_last_negative",
    "channels_last_strided",
)


def layouts_for(ndim: int) -> tuple[str, ...]:
    """Names of the layouts :func:`make_input` can build for inputs of ``ndim`` axes."""
    return LAYOUTS_ANY + (LAYOUTS_SPATIAL if ndim >= 3 else ())


def _channels_last_order(ndim: int) -> tuple[int, ...]:
    # Logical axes (N, C, *spatial) stored in memory as (N, *spatial, C).
    return (0, *range(2, ndim), 1)


def _channels_last(make, shape):
    order = _channels_last_order(len(shape))
    base = make(tuple(shape[axis] for axis in order))
    # base has axes (N, *spatial, C); put them back in logical order.
    return base.transpose(np.argsort(order))


def make_layout(make, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Build an array of logical ``shape`` in the memory ``layout`` named.

    ``make(shape)`` must return a new C-contiguous array of that shape; the
    result is a view into (or copy of) one such array, never a copy made by
    NumPy behind our back, so the strides are exactly the ones named.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if layout == "contiguous":
        x = make(shape)
    elif layout == "fortran":
        x = np.asfortranarray(make(shape))
    elif layout == "batch_slice":  # x[::2]
        x = make((2 * shape[0], *shape[1:]))[::2]
    elif layout == "channel_slice":  # x[:, ::2]
        x = make((shape[0], 2 * shape[1], *shape[2:]))[:, ::2]
    elif layout == "negative":  # every axis reversed
        x = make(shape)[(slice(None, None, -1),) * ndim]
    elif layout == "channels_last":  # transpose of a contiguous (N, *spatial, C) array
        x = _channels_last(make, shape)
    elif layout == "inner_slice":  # x[:, :, ::2] (and every other spatial axis)
        big = (shape[0], shape[1], *(2 * s for s in shape[2:]))
        x = make(big)[(slice(None), slice(None)) + (slice(None, None, 2),) * (ndim - 2)]
    elif layout == "crop":  # x[..., 1:-1, 1:-1]
        n_crop = min(2, ndim - 2)
        big = shape[: ndim - n_crop] + tuple(s + 2 for s in shape[ndim - n_crop :])
        x = make(big)[(Ellipsis,) + (slice(1, -1),) * n_crop]
    elif layout == "channels_last_slice":  # channels-last view, sliced along H
        big = (shape[0], shape[1], 2 * shape[2], *shape[3:])
        x = _channels_last(make, big)[:, :, ::2]
    elif layout == "channels_last_negative":  # channels-last view, reversed along N and H
        x = _channels_last(make, shape)[::-1, :, ::-1]
    elif layout == "channels_last_strided":  # channels-last view, every non-channel axis ::2
        big = (2 * shape[0], shape[1], *(2 * s for s in shape[2:]))
        x = _channels_last(make, big)[
            (slice(None, None, 2), slice(None)) + (slice(None, None, 2),) * (ndim - 2)
        ]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert x.shape == shape, (layout, x.shape, shape)
    return x


def make_input(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    layout: str = "contiguous",
    dtype=np.float64,
    loc: float = 0.0,
    scale: float = 1.0,
) -> np.ndarray:
    """Random normal data of logical ``shape`` and ``dtype`` in the memory ``layout``.

    Channel ``c`` gets an offset of ``loc + c`` and a scale of ``scale * (1 + c / 4)``
    so that every channel has statistics of its own.
    """

    def make(base_shape):
        data = rng.standard_normal(base_shape)
        return data.astype(dtype)

    x = make_layout(make, shape, layout)
    # Per-channel offset and scale, written through the view so the layout is kept.
    n_channels = shape[1]
    offset = (loc + np.arange(n_channels)).reshape((1, n_channels) + (1,) * (len(shape) - 2))
    factor = (scale * (1 + np.arange(n_channels) / 4)).reshape(offset.shape)
    x[...] = (x.astype(np.float64) * factor + offset).astype(dtype)
    return x


def random_vector(rng: np.random.Generator, n: int, dtype=np.float64, low=0.5, high=1.5):
    return rng.uniform(low, high, n).astype(dtype)


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded generator per test: results never depend on test order."""
    return np.random.default_rng(SEED)


def snapshot(module) -> dict:
    """A deep copy of everything observable about a numbabn module's state."""
    state = {
        "class": type(module),
        "num_features": module.num_features,
        "training": module.training,
        "grads": copy.deepcopy(module.grads),
    }
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        value = getattr(module, key)
        state[key] = None if value is None else value.copy()
    return state


def assert_same_state(before: dict, module) -> None:
    """Assert ``module``'s state is bit-for-bit what :func:`snapshot` recorded."""
    after = snapshot(module)
    assert after["class"] is before["class"]
    assert after["num_features"] == before["num_features"]
    assert after["training"] == before["training"]
    assert after["grads"].keys() == before["grads"].keys()
    for name in before["grads"]:
        _assert_identical(before["grads"][name], after["grads"][name], f"grads[{name}]")
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        _assert_identical(before[key], after[key], key)


def _assert_identical(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {a!r} vs {b!r}"
        return
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert a.tobytes() == b.tobytes(), f"{what}: {a} vs {b}"


def tolerances(dtype) -> dict:
    """``assert_allclose`` tolerances against a float64 truth for results in ``dtype``."""
    if np.dtype(dtype) == np.float32:
        return {"rtol": 2e-6, "atol": 2e-6}
    return {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture
def cuda_small_blocks(monkeypatch):
    """Several blocks, chunks and ragged channel groups on tiny shapes.

    Under the CUDA simulator: blocks of 16 threads (4 channel lanes) and chunks
    of a few values. On a real GPU the block sizes are compiled in, so only the
    chunking is made fine.
    """
    from numbabn._cuda import arrays, backend, kernels

    if arrays.SIMULATOR:
        monkeypatch.setattr(kernels, "THREADS", 16)
        monkeypatch.setattr(kernels, "LANES", 4)
    monkeypatch.setattr(backend, "TARGET_BLOCKS", 8)
    monkeypatch.setattr(backend, "MIN_PER_THREAD", 1)
    monkeypatch.setattr(backend, "MAX_PER_THREAD", 2)
