"""Shared fixtures and helpers: seeded data, inputs in many memory layouts, module state."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

# The CUDA backend's tests run in Numba's CUDA simulator unless told otherwise
# (``make test-gpu`` sets NUMBA_ENABLE_CUDASIM=0); this must precede importing numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# ``reference`` is a sibling module of the tests, importable without a package.
sys.path.insert(0, str(Path(__file__).parent))

# Layout builders, shared with the warm-up (after the simulator switch: this imports numba).
from numbabn._layouts import layouts_for, make_layout  # noqa: E402, F401

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


def _host_copy(array: Any) -> Any:
    """A host copy of a host or device array (None stays None)."""
    if array is None:
        return None
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.array(array, copy=True)


def snapshot(module) -> dict:
    """A host copy of everything observable about a numbabn module's state (any device)."""
    state = {
        "class": type(module),
        "num_features": module.num_features,
        "training": module.training,
        "grads": {name: _host_copy(value) for name, value in module.grads.items()},
    }
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        state[key] = _host_copy(getattr(module, key))
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


def to_torch(array: np.ndarray) -> Any:
    """A PyTorch tensor sharing ``array``'s memory, bfloat16 too (through its bits)."""
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def from_torch(tensor: Any) -> np.ndarray:
    """A CPU tensor as a NumPy array over its memory, bfloat16 as ``ml_dtypes.bfloat16``."""
    import torch

    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def tolerances(dtype) -> dict:
    """``assert_allclose`` tolerances against a float64 truth for results in ``dtype``."""
    if np.dtype(dtype) == np.float32:
        return {"rtol": 2e-6, "atol": 2e-6}
    return {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture
def cuda_small_blocks(monkeypatch):
    """Several blocks, chunks and ragged channel groups on tiny shapes.

    Under the CUDA simulator: blocks of 16 threads (at most 4 channels), chunks
    of a few values, and merges of partials two at a time. On a real GPU the block
    sizes are compiled in, so only the chunking is made fine.
    """
    from numbabn._cuda import arrays, backend, kernels

    if arrays.SIMULATOR:
        monkeypatch.setattr(kernels, "THREADS", 16)
        monkeypatch.setattr(kernels, "CHANNELS_PER_BLOCK", 4)
        monkeypatch.setattr(kernels, "MERGE_LOADS", 2)  # merges of several rounds
    monkeypatch.setattr(backend, "TARGET_BLOCKS", 8)
    monkeypatch.setattr(backend, "MIN_GRID_BLOCKS", 2)
    monkeypatch.setattr(backend, "MIN_PER_THREAD", 1)
    monkeypatch.setattr(backend, "MAX_PER_THREAD", 2)


class Device(NamedTuple):
    """A backend under test: its name, and how NumPy arrays go there and come back."""

    name: str
    put: Callable[[Any], Any]  # a NumPy array (or None) as this device's array
    get: Callable[[Any], Any]  # this device's array (or None) as a NumPy array
    simulated: bool = False  # Numba's CUDA simulator: seconds per launch, so fewer cases

    def skip_unless(self, wanted: bool) -> None:
        """In the simulator, run this case only if ``wanted`` (a GPU runs every case)."""
        if self.simulated and not wanted:
            pytest.skip("a GPU runs this case; the CUDA simulator runs a subset")


# Host arrays as they are.
CPU = Device("cpu", lambda array: array, lambda array: array)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> Device:
    """Each backend in turn, so that one semantic test covers both.

    ``cuda`` runs the CUDA kernels on a GPU, or in Numba's simulator with the
    small blocks of :func:`cuda_small_blocks` (several blocks, ragged groups).
    """
    if request.param == "cpu":
        return CPU
    pytest.importorskip("numba_cuda")
    request.getfixturevalue("cuda_small_blocks")
    from device import SIMULATOR, host, to_device
    from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

    def put(array):
        return None if array is None else to_device(array)

    def get(array):  # what a call returns on the host (a counter, say) stays as it is
        return host(array) if is_cuda_ndarray(array) else array

    return Device("cuda", put, get, SIMULATOR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the slow tests first (the order is otherwise kept).

    ``make test`` runs the tests on every core (pytest-xdist); started first, the
    long tests overlap the many short ones, instead of one of them finishing the
    run on one core while the others wait.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
