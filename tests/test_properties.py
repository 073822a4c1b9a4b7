"""Generated cases against PyTorch: module kinds, shapes, layouts, options and call sequences.

Each example draws a module configuration, builds the numbabn module and its
PyTorch twin, then runs a random sequence of calls on both (train/eval
switches, forwards with any input layout, backwards, ``zero_grad``, resets and
``state_dict`` round trips through PyTorch). After every step the outputs,
gradients, parameters, running statistics and the batch counter must agree; a
call PyTorch refuses must be refused with the same exception type, and leave
the numbabn module exactly as it was.

``make test`` runs these derandomized with a fixed budget (the ``ci`` profile);
``make fuzz`` runs them with a much larger random budget (the ``fuzz`` profile).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from conftest import Device, assert_same_state, make_layout, snapshot

import numbabn

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Relative agreement asked of every compared array. The PyTorch twin computes in
# float64 on the same values: its float32 kernels alone are further than 2e-5 from
# the truth when |mean| >> std, where numbabn (which accumulates in float64) is not.
# Half results are within an ulp of the exact result rounded: 1.5 ulps of the exact one.
RTOL = {"float32": 2e-5, "float64": 1e-10, "bfloat16": 1.5 * 2.0**-7, "float16": 1.5 * 2.0**-10}
# Momenta drawn besides any in [-0.5, 1.5]: the usual ones, and a negative and a NaN one
# (PyTorch updates the running statistics with any momentum).
MOMENTA = [0.1, 0.0, 1.0, -0.1, math.nan]
# Above this many elements the CPU backend takes its threaded path.
THREADED_ELEMENTS = 1 << 17


def as_tensor(array: np.ndarray, requires_grad: bool = False) -> Any:
    """A float64 tensor with the values of ``array`` (any layout, read-only included)."""
    return torch.tensor(np.array(array, np.float64, order="C"), requires_grad=requires_grad)


def oracle_error(x: np.ndarray, eps: float, factor: float = 1.0, backward: bool = False) -> float:
    """How far PyTorch's float64 results on ``x`` may be from the exact ones.

    Its per-channel sums of ``n`` values err by up to about ``n * 2**-52 *
    max|x|``, and normalising multiplies that by ``1 / std``: on a channel of
    many equal values its output is ~1e-9 where the exact one (numbabn's) is 0.
    ``factor`` scales the bound for what multiplies the output further (the
    sizes of ``dy`` and the weight in the backward).
    """
    if x.size == 0:
        return 0.0
    values = np.asarray(x, np.float64)
    axes = (0, *range(2, x.ndim))
    invstd = 1 / np.sqrt(values.var(axis=axes) + eps)
    condition = float(np.max(np.abs(values).max(axis=axes) * invstd))
    if backward:  # dy's sums are scaled by invstd once more
        condition *= max(1.0, float(np.max(invstd)))
    return float(np.finfo(np.float64).eps) * (x.size / x.shape[1]) * condition * factor


def agree(ours: Any, theirs: Any, dtype: np.dtype, what: str, slack: float = 0.0) -> None:
    """numbabn's array against a tensor: shape, ``dtype``, NaN/Inf pattern, values.

    Values agree within ``RTOL`` relative to the array's scale, plus ``slack``
    for the oracle's own error (:func:`oracle_error`).
    """
    if theirs is None:
        assert ours is None, f"{what}: numbabn has a value, PyTorch has None"
        return
    assert ours is not None, f"{what}: numbabn has None"
    expected = theirs.detach().numpy()
    ours = np.asarray(ours)
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape}"
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}"
    ours = ours.astype(np.float64)  # exact; NumPy compares no bfloat16 with float64
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected), f"{what}: NaN")
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(ours[~finite], expected[~finite], f"{what}: Inf")
    rtol = RTOL[dtype.name]
    scale = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    np.testing.assert_allclose(
        ours[finite], expected[finite], rtol=rtol, atol=rtol * scale + slack, err_msg=what
    )


@dataclass(frozen=True)
class Kind:
    """A module class of numbabn beside PyTorch's, and the input ranks it takes."""

    ours: type
    theirs: type
    ndims: tuple[int, ...]
    lazy: bool = False
    fused: bool = True  # takes activation= and residual=


def _sync_batch_norm(*args: Any, **kwargs: Any) -> Any:
    from mpi4py import MPI

    return numbabn.SyncBatchNorm(*args, comm=MPI.COMM_SELF, **kwargs)


KINDS = {
    "1d": Kind(numbabn.BatchNorm1d, torch.nn.BatchNorm1d, (2, 3)),
    "2d": Kind(numbabn.BatchNorm2d, torch.nn.BatchNorm2d, (4,)),
    "3d": Kind(numbabn.BatchNorm3d, torch.nn.BatchNorm3d, (5,)),
    "lazy1d": Kind(numbabn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d, (2, 3), lazy=True),
    "lazy2d": Kind(numbabn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d, (4,), lazy=True),
    "lazy3d": Kind(numbabn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d, (5,), lazy=True),
    # Without an initialised process group, PyTorch's SyncBatchNorm is plain batch norm.
    "sync": Kind(_sync_batch_norm, torch.nn.SyncBatchNorm, (2, 3, 4, 5), fused=False),
}
LAYOUT_NAMES = (
    "contiguous",
    "fortran",
    "batch_slice",
    "channel_slice",
    "negative",
    "channels_last",
    "inner_slice",
    "channels_last_negative",
    "channels_last_strided",
    "broadcast",
)
# Layouts of the arrays that go with an input (residual, dy, out=): one of each kind
# Numba compiles separately (contiguous, strided, reversed, read-only), since every
# combination of kinds across a call's arrays is a kernel variant to compile.
COMPANION_LAYOUTS = ("contiguous", "channels_last", "negative", "broadcast")


def build(shape: tuple[int, ...], layout: str, dtype: np.dtype, values: np.ndarray) -> np.ndarray:
    """``values`` (C-contiguous, of logical ``shape``) copied into an array of ``layout``.

    ``broadcast`` is a read-only view repeating the first batch item (it takes
    the first item of ``values`` only).
    """
    if layout == "broadcast":
        return np.broadcast_to(values[:1].astype(dtype), shape)
    if len(shape) < 3 and (layout.startswith("channels_last") or layout == "inner_slice"):
        layout = "contiguous"

    def make(base_shape: tuple[int, ...]) -> np.ndarray:
        return np.full(base_shape, np.nan, dtype)

    array = make_layout(make, shape, layout)
    array[...] = values
    return array


@st.composite
def shapes(draw: st.DrawFn, ndim: int, channels: int, large: bool = True) -> tuple[int, ...]:
    """A shape with ``channels`` channels: mostly tiny (size-1 and empty axes included),
    sometimes (when ``large``) large enough for the threaded CPU path."""
    if large and draw(st.integers(0, 9)) == 0:  # one example in ten: a threaded-path tensor
        spatial = ndim - 2
        per_item = math.ceil(THREADED_ELEMENTS / (4 * channels))
        side = max(1, math.ceil(per_item ** (1 / spatial))) if spatial else 1
        n = 4 if spatial else math.ceil(THREADED_ELEMENTS / channels)
        return (n, channels, *(side,) * spatial)
    n = draw(st.integers(0, 5) | st.just(1))
    spatial = draw(st.lists(st.integers(0, 5), min_size=ndim - 2, max_size=ndim - 2))
    if draw(st.booleans()):  # most cases have no empty axis
        spatial = [max(1, s) for s in spatial]
        n = max(1, n)
    return (n, channels, *spatial)


@dataclass
class Twins:
    """The numbabn module, its PyTorch twin, and what the last forward left for backward."""

    ours: Any
    theirs: Any
    kind: Kind
    dtype: np.dtype
    activation: str | None
    rng: np.random.Generator
    num_features: int
    ndim: int
    new_theirs: Callable[[], Any]  # a fresh PyTorch twin (used while still lazy)
    last: dict[str, Any] | None = None
    slack: float = 0.0  # the oracle's error bound for the last forward and backward
    log: list[str] = field(default_factory=list)

    @property
    def materialized(self) -> bool:
        return not self.kind.lazy or self.ours.num_features > 0

    # -- comparisons -----------------------------------------------------

    def agree(self, ours: Any, theirs: Any, what: str) -> None:
        agree(ours, theirs, self.dtype, f"{what}\n{self.trail}", self.slack)

    @property
    def trail(self) -> str:
        return "steps: " + " -> ".join(self.log)

    def agree_state(self) -> None:
        ours, theirs = self.ours, self.theirs
        if not self.materialized:
            return
        for key in ("weight", "bias", "running_mean", "running_var"):
            self.agree(getattr(ours, key), getattr(theirs, key), key)
        if theirs.num_batches_tracked is None:
            assert ours.num_batches_tracked is None
        else:
            assert ours.num_batches_tracked.dtype == np.int64
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked), self.trail
        for name in ("weight", "bias"):
            param = getattr(theirs, name)
            if param is not None:
                self.agree(ours.grads[name], param.grad, f"grad {name}")
            else:
                assert name not in ours.grads

    # -- steps -------------------------------------------------------------

    def both(self, what: str, ours_call: Any, theirs_call: Any) -> tuple[Any, Any] | None:
        """Run a call on both; if PyTorch refuses it, numbabn must refuse it unchanged."""
        self.log.append(what)
        before = snapshot(self.ours) if self.materialized else None
        # PyTorch counts the batch (and materialises a lazy module) before it
        # raises; numbabn's failed calls change nothing, so PyTorch's is rolled back.
        pristine = None if self.materialized else self.new_theirs()
        counter = self.theirs.num_batches_tracked if self.materialized else None
        counted = None if counter is None else counter.clone()
        try:
            expected = theirs_call()
        except Exception as theirs_error:
            with pytest.raises(type(theirs_error)):
                ours_call()
            if before is not None:
                assert_same_state(before, self.ours)
            if pristine is not None:  # still lazy: a fresh twin in the same mode
                self.theirs = pristine.train(self.theirs.training)
            elif counter is not None:
                counter.copy_(counted)
            self.log[-1] += f" [both raise {type(theirs_error).__name__}]"
            return None
        return ours_call(), expected

    def set_mode(self, training: bool) -> None:
        self.log.append("train" if training else "eval")
        self.ours.train(training)
        self.theirs.train(training)

    def forward(self, data: st.DataObject) -> None:
        shape = data.draw(shapes(self.ndim, self.num_features), label="shape")
        layout = data.draw(st.sampled_from(LAYOUT_NAMES), label="layout")
        loc = data.draw(st.sampled_from([0.0, 3.0, -100.0]), label="loc")
        values = (
            self.rng.standard_normal(shape)
            * (1 + np.arange(shape[1])).reshape((1, -1) + (1,) * (len(shape) - 2))
            / 4
            + loc
        )
        x = build(shape, layout, self.dtype, values)
        residual = None
        if self.kind.fused and data.draw(st.booleans(), label="residual"):
            residual_layout = data.draw(st.sampled_from(COMPANION_LAYOUTS), label="residual layout")
            residual = build(shape, residual_layout, self.dtype, self.rng.standard_normal(shape))
        out = self.draw_out(data, shape, "out")
        tx = as_tensor(x, requires_grad=True)
        tz = None if residual is None else as_tensor(residual, requires_grad=True)

        def theirs() -> Any:
            y = self.theirs(tx)
            if tz is not None:
                y = y + tz
            return torch.relu(y) if self.activation else y

        def ours() -> Any:
            if residual is None:
                return self.ours(x, out)
            return self.ours(x, out, residual=residual)

        label = f"forward {shape} {layout}" + (" +residual" if residual is not None else "")
        result = self.both(label + (" out=" if out is not None else ""), ours, theirs)
        if result is None:
            return
        y, ty = result
        if out is not None:
            assert y is out
        self.slack = oracle_error(x, float(self.ours.eps))
        self.agree(y, ty, "output")
        self.last = {"x": x, "tx": tx, "tz": tz, "ty": ty, "shape": shape}

    def draw_out(self, data: st.DataObject, shape: tuple[int, ...], label: str) -> Any:
        """None, or a writeable ``out=`` array of any layout."""
        if not data.draw(st.booleans(), label=label):
            return None
        layout = data.draw(st.sampled_from(COMPANION_LAYOUTS[:-1]), label=f"{label} layout")
        return build(shape, layout, self.dtype, np.zeros(shape))

    def backward(self, data: st.DataObject) -> None:
        if self.last is None:
            return
        shape = self.last["shape"]
        layout = data.draw(st.sampled_from(COMPANION_LAYOUTS), label="dy layout")
        dy = build(shape, layout, self.dtype, self.rng.standard_normal(shape))
        out = self.draw_out(data, shape, "dx out")
        tx, tz = self.last["tx"], self.last["tz"]

        def theirs() -> Any:
            tx.grad = None
            if tz is not None:
                tz.grad = None
            self.last["ty"].backward(as_tensor(dy), retain_graph=True)
            return tx.grad, None if tz is None else tz.grad

        def ours() -> Any:
            return self.ours.backward(dy, out)

        result = self.both(
            f"backward {layout}" + (" out=" if out is not None else ""), ours, theirs
        )
        if result is None:
            return
        grads, (tdx, tdz) = result
        weight = 1.0 if self.ours.weight is None else float(np.max(np.abs(self.ours.weight)))
        scale = max(1.0, float(np.max(np.abs(dy), initial=0.0))) * max(1.0, weight)
        self.slack = oracle_error(self.last["x"], float(self.ours.eps), scale, backward=True)
        dx, dz = grads if tz is not None else (grads, None)
        if out is not None:
            assert dx is out
        self.agree(dx, tdx, "grad input")
        self.agree(dz, tdz, "grad residual")

    def zero_grad(self, set_to_none: bool) -> None:
        self.log.append(f"zero_grad({set_to_none})")
        self.ours.zero_grad(set_to_none)
        self.theirs.zero_grad(set_to_none)

    def reset(self, which: str) -> None:
        if self.both(which, getattr(self.ours, which), getattr(self.theirs, which)):
            self.last = None  # PyTorch's graph saw the parameters change in place

    def round_trip(self) -> None:
        """numbabn's state into PyTorch's module and back: nothing changes on the way."""
        if not self.materialized:
            return
        self.log.append("state_dict round trip")
        state = self.ours.state_dict()
        self.theirs.load_state_dict({key: torch.tensor(value) for key, value in state.items()})
        back = {key: value.numpy() for key, value in self.theirs.state_dict().items()}
        if self.ours.bias is None and "bias" in back:
            del back["bias"]
        self.ours.load_state_dict(back)
        for key, value in self.ours.state_dict().items():
            np.testing.assert_array_equal(value, state[key], key)
        self.last = None

    def load_from_torch(self) -> None:
        """New parameters and statistics in PyTorch's module, loaded into numbabn's."""
        if not self.materialized:
            return
        self.log.append("load_state_dict from PyTorch")
        c, rng = self.num_features, self.rng
        with torch.no_grad():
            for name, low, high in (
                ("weight", 0.5, 1.5),
                ("bias", -1.0, 1.0),
                ("running_mean", -2.0, 2.0),
                ("running_var", 0.2, 3.0),
            ):
                tensor = getattr(self.theirs, name)
                if tensor is not None:
                    tensor.copy_(as_tensor(rng.uniform(low, high, c).astype(self.dtype)))
            if self.theirs.num_batches_tracked is not None:
                self.theirs.num_batches_tracked.fill_(int(rng.integers(0, 50)))
        state = {key: value.numpy() for key, value in self.theirs.state_dict().items()}
        if self.ours.bias is None:
            state.pop("bias", None)
        self.ours.load_state_dict(state)
        self.last = None


@st.composite
def twins(draw: st.DrawFn) -> Twins:
    """A module configuration, built for numbabn and for PyTorch with the same parameters."""
    kind_name = draw(st.sampled_from(sorted(KINDS)), label="kind")
    kind = KINDS[kind_name]
    ndim = draw(st.sampled_from(kind.ndims), label="ndim")
    channels = draw(st.integers(1, 70) | st.sampled_from([1, 2, 3]), label="channels")
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64]), label="dtype"))
    momentum = draw(st.none() | st.sampled_from(MOMENTA) | st.floats(-0.5, 1.5), label="momentum")
    eps = draw(st.sampled_from([1e-5, 1e-3]) | st.floats(1e-6, 1.0), label="eps")
    affine = draw(st.booleans(), label="affine")
    bias = draw(st.booleans(), label="bias")
    track = draw(st.booleans(), label="track_running_stats")
    activation = draw(st.sampled_from([None, "relu"]), label="activation") if kind.fused else None
    options = {
        "eps": eps,
        "momentum": momentum,
        "affine": affine,
        "track_running_stats": track,
        "dtype": dtype,
        "bias": bias,
    }
    args = () if kind.lazy else (channels,)
    extra = {"activation": activation} if activation else {}
    ours = kind.ours(*args, **options, **extra)

    def new_theirs() -> Any:
        return kind.theirs(*args, **{**options, "dtype": torch.float64})

    theirs = new_theirs()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    if not kind.lazy:
        with torch.no_grad():
            for name, low, high in (("weight", 0.5, 1.5), ("bias", -1.0, 1.0)):
                if getattr(ours, name) is not None:
                    value = rng.uniform(low, high, channels).astype(dtype)
                    getattr(ours, name)[...] = value
                    getattr(theirs, name).copy_(as_tensor(value))
    return Twins(ours, theirs, kind, dtype, activation, rng, channels, ndim, new_theirs)


STEPS = (
    "forward",
    "forward",
    "backward",
    "backward",
    "train",
    "eval",
    "zero_grad",
    "round_trip",
    "load_from_torch",
    "reset_running_stats",
    "reset_parameters",
)


@given(twins(), st.data())
def test_call_sequences_agree_with_pytorch(pair: Twins, data: st.DataObject) -> None:
    """A random sequence of calls gives PyTorch's results after every step."""
    steps = data.draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=8), label="steps")
    for step in ["forward", *steps]:
        if step == "forward":
            pair.forward(data)
        elif step == "backward":
            pair.backward(data)
        elif step in ("train", "eval"):
            pair.set_mode(step == "train")
        elif step == "zero_grad":
            pair.zero_grad(data.draw(st.booleans(), label="set_to_none"))
        elif step == "round_trip":
            pair.round_trip()
        elif step == "load_from_torch":
            pair.load_from_torch()
        else:
            pair.reset(step)
        pair.agree_state()


@given(st.data())
@settings(
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture]
)
def test_functional_batch_norm_agrees_with_pytorch(device: Device, data: st.DataObject) -> None:
    """``numbabn.functional.batch_norm`` against ``torch.nn.functional.batch_norm``, on each
    backend (the simulator's CUDA kernels on tiny shapes only: a second per thousand values)."""
    ndim = data.draw(st.integers(2, 5), label="ndim")
    channels = data.draw(st.integers(1, 70), label="channels")
    shape = data.draw(shapes(ndim, channels, large=not device.simulated), label="shape")
    dtype = np.dtype(data.draw(st.sampled_from([np.float32, np.float64]), label="dtype"))
    layout = data.draw(st.sampled_from(LAYOUT_NAMES), label="layout")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = build(shape, layout, dtype, rng.standard_normal(shape) + 2.0)

    def vector(name: str, low: float, high: float) -> np.ndarray | None:
        present = data.draw(st.booleans(), label=name)
        return rng.uniform(low, high, channels).astype(dtype) if present else None

    running_mean, running_var = vector("running_mean", -1, 1), vector("running_var", 0.5, 2)
    weight, bias = vector("weight", 0.5, 1.5), vector("bias", -1, 1)
    training = data.draw(st.booleans(), label="training")
    momentum = data.draw(st.sampled_from(MOMENTA) | st.floats(-0.5, 1.5), label="momentum")
    eps = data.draw(st.sampled_from([1e-5, 0.0, -1e-3]) | st.floats(1e-6, 1.0), label="eps")

    def tensor(array: np.ndarray | None) -> Any:
        return None if array is None else as_tensor(array)

    theirs_stats = [tensor(running_mean), tensor(running_var)]
    ours_stats = [device.put(None if v is None else v.copy()) for v in (running_mean, running_var)]
    arguments = (device.put(x), *ours_stats, device.put(weight), device.put(bias), training)
    try:
        expected = torch.nn.functional.batch_norm(
            as_tensor(x), *theirs_stats, tensor(weight), tensor(bias), training, momentum, eps
        )
    except Exception as error:
        with pytest.raises(type(error)):
            numbabn.functional.batch_norm(*arguments, momentum, eps)
        for ours, before in zip(ours_stats, (running_mean, running_var), strict=True):
            assert ours is None or device.get(ours).tobytes() == before.tobytes()
        return
    y = device.get(numbabn.functional.batch_norm(*arguments, momentum, eps))
    agree(y, expected, dtype, "output", oracle_error(x, eps) if eps > 0 else 0.0)
    for name, ours, theirs in zip(
        ("running_mean", "running_var"), ours_stats, theirs_stats, strict=True
    ):
        agree(device.get(ours), theirs, dtype, name)


@settings(max_examples=12)
@given(st.data())
def test_half_data_agrees_with_pytorch(data: st.DataObject) -> None:
    """bfloat16 and float16 data into float32 modules (mixed precision) or modules of their
    own dtype, fused ReLU and residual included: the PyTorch float64 twin's results on the
    same values, within an ulp of them rounded."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(data.draw(st.sampled_from([ml_dtypes.bfloat16, np.float16]), label="dtype"))
    param_dtype = np.dtype(data.draw(st.sampled_from([np.float32, dtype]), label="module dtype"))
    kind = KINDS[data.draw(st.sampled_from(["1d", "2d", "3d"]), label="kind")]
    ndim = data.draw(st.sampled_from(kind.ndims), label="ndim")
    channels = data.draw(st.integers(1, 70), label="channels")
    shape = data.draw(shapes(ndim, channels), label="shape")
    hypothesis.assume(0 not in shape and math.prod(shape) > channels)
    layout = data.draw(st.sampled_from(LAYOUT_NAMES), label="layout")
    activation = data.draw(st.sampled_from([None, "relu"]), label="activation")
    training = data.draw(st.booleans(), label="training")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = build(shape, layout, dtype, rng.standard_normal(shape) * 2 + 3)
    residual = None
    if data.draw(st.booleans(), label="residual"):
        residual_layout = data.draw(st.sampled_from(COMPANION_LAYOUTS), label="residual layout")
        residual = build(shape, residual_layout, dtype, rng.standard_normal(shape))
    dy_layout = data.draw(st.sampled_from(COMPANION_LAYOUTS), label="dy layout")
    dy = build(shape, dy_layout, dtype, rng.standard_normal(shape))

    ours = kind.ours(channels, dtype=param_dtype, activation=activation).train(training)
    theirs = kind.theirs(channels, dtype=torch.float64).train(training)
    with torch.no_grad():
        for name, low, high in (("weight", 0.5, 1.5), ("bias", -1.0, 1.0)):
            getattr(ours, name)[...] = rng.uniform(low, high, channels).astype(param_dtype)
            getattr(theirs, name).copy_(as_tensor(getattr(ours, name)))
    tx = as_tensor(x, requires_grad=True)
    tz = None if residual is None else as_tensor(residual, requires_grad=True)
    ty = theirs(tx) if tz is None else theirs(tx) + tz
    ty = torch.relu(ty) if activation else ty
    y = ours(x, residual=residual)
    slack = oracle_error(x, float(ours.eps))
    agree(y, ty, dtype, "output", slack)
    grads = ours.backward(dy)
    ty.backward(as_tensor(dy))
    dx, dz = grads if residual is not None else (grads, None)
    slack = oracle_error(x, float(ours.eps), float(np.max(np.abs(dy.astype(np.float64)))), True)
    agree(dx, tx.grad, dtype, "grad input", slack)
    agree(dz, None if tz is None else tz.grad, dtype, "grad residual")
    for key in ("running_mean", "running_var"):
        agree(getattr(ours, key), getattr(theirs, key), param_dtype, key)
    for name in ("weight", "bias"):
        agree(ours.grads[name], getattr(theirs, name).grad, param_dtype, f"grad {name}", slack)
