"""Every argument check PyTorch makes, as a table: numbabn raises what PyTorch raises.

Each row makes the same call on PyTorch (the oracle) and on numbabn. Either
both raise the same exception type with the same message, or both succeed
with the same output, running statistics and batch counter. A failed numbabn
call must leave its module, or the arrays passed to the functional API,
exactly as they were (PyTorch itself counts the batch and materialises lazy
modules before some of its checks; numbabn does neither).

A row with a ``deviation`` records where numbabn knowingly differs, and why:
it then asserts numbabn's own error (``ours``) and, via ``translate``, how
PyTorch's message maps onto it where only the wording of a value differs.

numbabn's message is PyTorch's, then, for the checks whose cause a NumPy user
may not see, one sentence that says what to do: :data:`ADVICE` is that column,
one regular expression per kind of check, and every other check adds nothing.

Every call row runs on each backend (conftest's ``device`` fixture): on the
CUDA kernels (in the simulator without a GPU), numbabn's arrays and modules
live on the device and the results come back to compare. A row that runs on
the CPU backend only says why (``cpu_only``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from conftest import Device, assert_same_state, from_torch, snapshot, to_torch

import numbabn
from numbabn import functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional

NAN, INF = float("nan"), float("inf")
ml_dtypes = pytest.importorskip("ml_dtypes")
TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
}
HALVES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
SHAPE = (4, 3, 2, 2)


@dataclass
class Case:
    """One row: the same call on PyTorch and on numbabn.

    ``ours`` builds the numbabn call and returns ``(call, watched)``: ``watched``
    is the module, or the tuple of arrays, that a failed call must not change.
    """

    id: str
    theirs: Callable[[], Any]
    ours: Callable[[Device], tuple[Callable[[], Any], Any]]
    deviation: str | None = None  # why numbabn differs from PyTorch here
    expect: tuple[type[BaseException], str] | None = None  # numbabn's error and its start
    translate: Callable[[str], str] | None = None  # PyTorch's message in numbabn's words
    cpu_only: str | None = None  # why the row runs on the CPU backend only


# The sentence numbabn adds after PyTorch's message (a regular expression), per check.
ADVICE = {
    r"\w+ should contain \d+ elements not \d+": (
        r"numbabn takes the channels from axis 1 of the input, which has shape \([\d, ]+\): "
        r"\d+ there, where \w+ has \d+(; the last axis has \d+: for channels-last data pass "
        r"x\.transpose\([\d, ]+\), a view that copies nothing)?"
    ),
    r"\"batch_norm\" not implemented for '\w+'": (
        r"numbabn takes float32 and float64 \(and (bfloat16 and )?float16\) input, not \w+: "
        r"convert it with x\.astype\(np\.float32\)"
    ),
    r"(empty|zeros)\(\): argument 'size' \(position 1\) must be tuple of ints, not [\w.]+": (
        r"num_features is the number of channels \(axis 1 of the input\) and must be an int, "
        r"such as 3; got .+"
    ),
    r"(mixed dtype \(CPU\): expect parameter to have scalar type of Float|"
    r"mixed dtype \(CPU\): all inputs must share same datatype\.|"
    r"expected scalar type \w+ but found \w+)": (
        r"weight, bias, running_mean and running_var must be (float32|float64) for "
        r"(bfloat16|float16|float32|float64) input: "
        r"convert them with \.astype\(np\.(float32|float64)\), "
        r"or convert the input"
    ),
    r"(Trying to create tensor with negative dimension -\d+: \[-\d+\]|"
    r"zeros: Dimension size must be non-negative\.)": (
        r"num_features is the number of channels and cannot be negative; got -\d+"
    ),
}


def assert_pytorch_message_then_advice(text: str, message: str) -> None:
    """``text`` is PyTorch's ``message``, then the sentence :data:`ADVICE` names, if any."""
    advice = [added for check, added in ADVICE.items() if re.fullmatch(check, message)]
    if not advice:
        assert text == message
        return
    assert text.startswith(message), f"{text!r} does not start with PyTorch's {message!r}"
    added = text[len(message) :]
    assert re.fullmatch(r"\.? " + advice[0], added), f"added sentence {added!r}"


def _tensor(value: Any) -> Any:
    return to_torch(value.copy()) if isinstance(value, np.ndarray) else value


def _host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return from_torch(value.detach())
    return value


def _data(shape: tuple[int, ...], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    return np.ones(shape, dtype)


def _vec(n: int | tuple[int, ...], fill: float, dtype: Any = np.float32) -> np.ndarray:
    return np.full(n, fill, dtype)


# -- functional rows ---------------------------------------------------------------------


def functional(
    id: str,
    x: Any = (4, 3),
    rm: Any = 3,
    rv: Any = 3,
    w: Any = None,
    b: Any = None,
    training: Any = True,
    momentum: Any = 0.1,
    eps: Any = 1e-5,
    **deviation: Any,
) -> Case:
    """``F.batch_norm`` on both libraries; ints and tuples stand for float32 arrays."""
    if isinstance(x, tuple):
        x = _data(x)
    vectors = [
        _vec(v, fill) if isinstance(v, (int, tuple)) else v
        for v, fill in ((rm, 0.5), (rv, 2.0), (w, 1.5), (b, -0.5))
    ]

    def theirs() -> tuple[Any, ...]:
        rm, rv, w, b = map(_tensor, vectors)
        out = TF.batch_norm(_tensor(x), rm, rv, w, b, training, momentum, eps)
        return out, rm, rv

    def ours(device: Device) -> tuple[Callable[[], Any], Any]:
        rm, rv, w, b = (device.put(v.copy()) if isinstance(v, np.ndarray) else v for v in vectors)
        xx = device.put(x.copy()) if isinstance(x, np.ndarray) else x

        def call() -> tuple[Any, ...]:
            return F.batch_norm(xx, rm, rv, w, b, training, momentum, eps), rm, rv

        return call, (rm, rv, w, b)

    return Case(id, theirs, ours, **deviation)


# -- module rows -------------------------------------------------------------------------


def module(
    id: str,
    kind: str,
    args: tuple[Any, ...] = (3,),
    kwargs: dict[str, Any] | None = None,
    x: Any = (4, 3),
    train: bool = True,
    warm: tuple[int, ...] | None = None,
    dtype: Any = np.float32,
    **deviation: Any,
) -> Case:
    """Build ``kind`` on both libraries (``warm``: one good step first), then call it on ``x``.

    numbabn's SyncBatchNorm gets one rank (``MPI.COMM_SELF``); PyTorch's, without a
    process group, is ``F.batch_norm`` with its own checks of the input first.
    """
    kwargs = kwargs or {}
    if isinstance(x, tuple):
        x = _data(x)
    warm_x = None if warm is None else _data(warm, dtype, seed=1)

    def theirs() -> tuple[Any, ...]:
        m = getattr(torch.nn, kind)(*args, dtype=TORCH_DTYPES[np.dtype(dtype)], **kwargs)
        if warm_x is not None:
            m(_tensor(warm_x))
        m.train(train)
        return m(_tensor(x)), m.running_mean, m.running_var, m.num_batches_tracked

    def ours(device: Device) -> tuple[Callable[[], Any], Any]:
        extra = {"comm": _one_rank()} if kind == "SyncBatchNorm" else {}
        m = getattr(numbabn, kind)(*args, dtype=dtype, device=device.name, **kwargs, **extra)
        if warm_x is not None:
            m(device.put(warm_x))
            m.backward(device.put(np.ones_like(warm_x)))
        m.train(train)
        xx = device.put(x) if isinstance(x, np.ndarray) else x

        def call() -> tuple[Any, ...]:
            return m(xx), m.running_mean, m.running_var, m.num_batches_tracked

        return call, m

    return Case(id, theirs, ours, **deviation)


def _one_rank() -> Any:
    """``MPI.COMM_SELF``: SyncBatchNorm on one rank (skips the row without mpi4py)."""
    return pytest.importorskip("mpi4py.MPI").COMM_SELF


def construct(id: str, kind: str, *args: Any, **kwargs: Any) -> Case:
    """Construction alone (``deviation``, ``expect`` and ``translate`` are the Case's)."""
    row_keys = ("deviation", "expect", "translate", "cpu_only")
    row = {key: kwargs.pop(key) for key in row_keys if key in kwargs}

    def theirs() -> None:
        getattr(torch.nn, kind)(*args, **kwargs)

    def ours(device: Device) -> tuple[Callable[[], Any], Any]:
        def call() -> None:
            getattr(numbabn, kind)(*args, **kwargs)

        return call, None

    row.setdefault("cpu_only", CONSTRUCTION)
    return Case(id, theirs, ours, **row)


def _size_as_tuple(message: str) -> str:
    """``torch.Size([1, 3])`` as NumPy writes the shape: ``(1, 3)``."""

    def as_tuple(match: re.Match[str]) -> str:
        dims = [d.strip() for d in match.group(1).split(",") if d.strip()]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)", as_tuple, message)


NOT_AN_ARRAY = (
    "numbabn takes arrays (NumPy, other host arrays, CUDA arrays); PyTorch's parser (or, in "
    "training, its input.size() call) names Tensor instead"
)
LIST_ERROR = (
    "expected a NumPy array, another CPU array (one exporting DLPack or the NumPy array "
    "interface: a PyTorch CPU tensor, a JAX CPU array, a numpy.memmap) or a CUDA array, "
    "got builtins.list; convert it with numpy.asarray(x, dtype=numpy.float32)"
)
MODULE_DTYPE = (
    "a module's parameter-dtype error is PyTorch's text, then which module, both dtypes "
    "and both remedies"
)


def _explained(kind: str, module_dtype: Any, input_dtype: Any) -> Callable[[str], str]:
    """PyTorch's message for a module call, followed by numbabn's explanation."""
    module_dtype, input_dtype = np.dtype(module_dtype), np.dtype(input_dtype)
    method = ".double()" if input_dtype == np.float64 else ".float()"

    def explained(message: str) -> str:
        return (
            f"{message}{'' if message.endswith('.') else '.'} {kind} has {module_dtype} "
            f"parameters and running statistics but the input is {input_dtype}: construct "
            f"the module with dtype=np.{input_dtype} (or convert it with {method} or "
            f".to(dtype=np.{input_dtype})), or convert the input to {module_dtype}"
        )

    return explained


CONSTRUCTION = "construction touches no array"
BELOW_2D = (
    "PyTorch reads input.size(1) of a 1-D input past its end (its message quotes a "
    "meaningless channel count) or fails with IndexError on 0-D input; numbabn says "
    "what is wrong"
)
SIZE_TUPLE = "the size is NumPy's shape tuple rather than a torch.Size; the sentence is the same"
OVER_ALL_RANKS = (
    "SyncBatchNorm counts the values of all ranks, after exchanging them: its message says "
    "so, and the size is NumPy's shape tuple"
)

CASES = [
    # -- construction: num_features, as torch.empty / torch.zeros check it --------------
    construct("num_features=-1", "BatchNorm1d", -1),
    construct("num_features=-1 affine=False", "BatchNorm1d", -1, affine=False),
    construct("num_features=np.int64(-2)", "BatchNorm2d", np.int64(-2)),
    construct("num_features=2.5", "BatchNorm1d", 2.5),
    construct("num_features=3.0", "BatchNorm1d", 3.0),
    construct("num_features=np.float64(3)", "BatchNorm3d", np.float64(3.0)),
    construct("num_features=True", "BatchNorm1d", True),
    construct("num_features=np.True_", "BatchNorm1d", np.True_),
    construct("num_features='3'", "BatchNorm1d", "3"),
    construct("num_features=None", "BatchNorm1d", None),
    construct("num_features=3+0j", "BatchNorm1d", 3 + 0j),
    construct("num_features=2.5 affine=False", "BatchNorm1d", 2.5, affine=False),
    construct("num_features=2.5 bias=False", "BatchNorm1d", 2.5, bias=False),
    construct("num_features=np.int64(3)", "BatchNorm1d", np.int64(3)),
    construct("num_features=0", "BatchNorm2d", 0),
    construct(
        "num_features=-1 unused (no affine, no stats)",
        "BatchNorm1d",
        -1,
        affine=False,
        track_running_stats=False,
    ),
    construct(
        "num_features='a' unused (no affine, no stats)",
        "BatchNorm1d",
        "a",
        affine=False,
        track_running_stats=False,
    ),
    construct(
        "num_features=[3]",
        "BatchNorm1d",
        [3],
        deviation="PyTorch takes a size list here; numbabn takes a count of channels",
        expect=(TypeError, "num_features must be an int, got list"),
    ),
    # eps and momentum are kept as given and checked at call time
    construct("eps=-1 accepted at construction", "BatchNorm1d", 3, eps=-1.0),
    construct("eps='a' accepted at construction", "BatchNorm1d", 3, eps="a"),
    construct("momentum=1.5 accepted at construction", "BatchNorm1d", 3, momentum=1.5),
    construct("momentum='a' accepted at construction", "LazyBatchNorm1d", momentum="a"),
    # -- module calls: eps ------------------------------------------------------------------
    module("eps=0 train", "BatchNorm1d", kwargs={"eps": 0.0}),
    module("eps=0 (int) train", "BatchNorm1d", kwargs={"eps": 0}),
    module("eps=0 eval", "BatchNorm1d", kwargs={"eps": 0.0}, train=False),
    module(
        "eps=0 eval without running stats",
        "BatchNorm1d",
        kwargs={"eps": 0.0, "track_running_stats": False},
        train=False,
    ),
    module("eps=-1 train", "BatchNorm2d", kwargs={"eps": -1.0}, x=(2, 3, 2, 2)),
    module("eps=-1 eval", "BatchNorm1d", kwargs={"eps": -1.0}, train=False),
    module("eps=-1e-5 eval", "BatchNorm3d", kwargs={"eps": -1e-5}, x=(2, 3, 1, 2, 2), train=False),
    module("eps=-1 eval empty batch", "BatchNorm1d", kwargs={"eps": -1.0}, x=(0, 3), train=False),
    module("eps=-1 lazy stays lazy", "LazyBatchNorm1d", (), {"eps": -1.0}),
    module("eps=nan train", "BatchNorm1d", kwargs={"eps": NAN}),
    module("eps=inf eval", "BatchNorm1d", kwargs={"eps": INF}, train=False),
    module("eps='a' train", "BatchNorm1d", kwargs={"eps": "a"}),
    module("eps='a' eval", "BatchNorm1d", kwargs={"eps": "a"}, train=False),
    module("eps=None train", "BatchNorm1d", kwargs={"eps": None}),
    module("eps=Fraction train", "BatchNorm1d", kwargs={"eps": Fraction(1, 1000)}),
    module("eps=True train", "BatchNorm1d", kwargs={"eps": True}),
    # -- module calls: momentum ---------------------------------------------------------------
    module("momentum=1.5 train", "BatchNorm1d", kwargs={"momentum": 1.5}, warm=(4, 3)),
    module("momentum=-0.1 train", "BatchNorm1d", kwargs={"momentum": -0.1}),
    module("momentum=2 (int) train", "BatchNorm2d", kwargs={"momentum": 2}, x=(2, 3, 2, 2)),
    module("momentum=nan train", "BatchNorm1d", kwargs={"momentum": NAN}),
    module("momentum=inf train", "BatchNorm1d", kwargs={"momentum": INF}),
    module("momentum=1.5 eval", "BatchNorm1d", kwargs={"momentum": 1.5}, train=False),
    module("momentum=-1 lazy", "LazyBatchNorm1d", (), {"momentum": -1.0}),
    module("momentum=None eval", "BatchNorm1d", kwargs={"momentum": None}, train=False),
    module("momentum='a' train", "BatchNorm1d", kwargs={"momentum": "a"}),
    module("momentum='a' eval", "BatchNorm1d", kwargs={"momentum": "a"}, train=False),
    module(
        "momentum='a' without running stats",
        "BatchNorm1d",
        kwargs={"momentum": "a", "track_running_stats": False},
    ),
    module("momentum=Fraction train", "BatchNorm1d", kwargs={"momentum": Fraction(1, 2)}),
    module("momentum=np.float32 train", "BatchNorm1d", kwargs={"momentum": np.float32(0.5)}),
    # -- module calls: shapes ----------------------------------------------------------------
    module("2d module, 3D input", "BatchNorm2d", x=(4, 3, 5), warm=(4, 3, 2, 2)),
    module("1d module, 4D input", "BatchNorm1d", x=(2, 3, 4, 5)),
    module("3d module, 4D input, lazy", "LazyBatchNorm3d", (), x=(2, 3, 4, 5)),
    module("channel count 4 vs 3 train", "BatchNorm1d", x=(4, 4), warm=(4, 3)),
    module("channel count 4 vs 3 eval", "BatchNorm1d", x=(4, 4), train=False),
    module("channels-last data", "BatchNorm2d", x=(2, 5, 6, 3)),
    module("channels-last 3-D data", "BatchNorm1d", x=(2, 7, 3)),
    module(
        "channel count without running stats",
        "BatchNorm1d",
        kwargs={"track_running_stats": False},
        x=(4, 4),
    ),
    module(
        "channel count without any state",
        "BatchNorm1d",
        kwargs={"track_running_stats": False, "affine": False},
        x=(4, 4),
    ),
    module(
        "one value per channel train",
        "BatchNorm2d",
        x=(1, 3, 1, 1),
        warm=(2, 3, 1, 1),
        deviation=SIZE_TUPLE,
        translate=_size_as_tuple,
    ),
    module(
        "one value per channel lazy",
        "LazyBatchNorm1d",
        (),
        x=(1, 3),
        deviation=SIZE_TUPLE,
        translate=_size_as_tuple,
    ),
    module("one value per channel eval", "BatchNorm1d", x=(1, 3), train=False),
    module(
        "one value per channel eval without running stats",
        "BatchNorm1d",
        kwargs={"track_running_stats": False},
        x=(1, 3),
        train=False,
        deviation=SIZE_TUPLE,
        translate=_size_as_tuple,
    ),
    module("empty batch train", "BatchNorm1d", x=(0, 3), warm=(4, 3)),
    module("empty batch eval", "BatchNorm2d", x=(0, 3, 2, 2), train=False),
    module("empty batch, wrong channel count", "BatchNorm1d", x=(0, 4)),
    module("empty spatial train", "BatchNorm1d", x=(2, 3, 0)),
    module(
        "zero channels with affine parameters",
        "BatchNorm1d",
        (0,),
        x=(4, 0),
        deviation="PyTorch's empty-input path reads weight[0] and fails on a zero-channel "
        "weight; an empty output is well defined",
        expect=None,
    ),
    module("zero channels without affine", "BatchNorm1d", (0,), {"affine": False}, x=(4, 0)),
    module(
        "1-D input to a lazy module",
        "LazyBatchNorm1d",
        (),
        x=(5,),
        deviation="PyTorch infers num_features from input.shape[1] before checking the rank "
        "(IndexError); numbabn checks the rank first and stays lazy",
        expect=(ValueError, "expected 2D or 3D input (got 1D input)"),
    ),
    # -- module calls: dtypes ----------------------------------------------------------------
    module(
        "float64 input, float32 module",
        "BatchNorm1d",
        x=_data((4, 3), np.float64),
        deviation=MODULE_DTYPE,
        translate=_explained("BatchNorm1d", np.float32, np.float64),
    ),
    module(
        "float64 input, float32 module, eval",
        "BatchNorm1d",
        x=_data((4, 3), np.float64),
        train=False,
        deviation=MODULE_DTYPE,
        translate=_explained("BatchNorm1d", np.float32, np.float64),
    ),
    module(
        "float64 input, float32 module, no affine",
        "BatchNorm1d",
        kwargs={"affine": False},
        x=_data((4, 3), np.float64),
        deviation=MODULE_DTYPE,
        translate=_explained("BatchNorm1d", np.float32, np.float64),
    ),
    module(
        "float64 input, float32 lazy module",
        "LazyBatchNorm2d",
        (),
        x=_data((2, 3, 2, 2), np.float64),
        deviation=MODULE_DTYPE,
        translate=_explained("BatchNorm2d", np.float32, np.float64),
    ),
    module(
        "float64 input, module without any state",
        "BatchNorm1d",
        kwargs={"affine": False, "track_running_stats": False},
        x=_data((4, 3), np.float64),
    ),
    module(
        "float32 input, float64 module",
        "BatchNorm1d",
        dtype=np.float64,
        deviation=MODULE_DTYPE,
        translate=_explained("BatchNorm1d", np.float64, np.float32),
    ),
    module(
        "float32 input, float64 module without bias",
        "BatchNorm1d",
        kwargs={"bias": False},
        dtype=np.float64,
        deviation=MODULE_DTYPE,
        translate=_explained("BatchNorm1d", np.float64, np.float32),
    ),
    module("int64 input", "BatchNorm1d", x=np.ones((4, 3), np.int64), warm=(4, 3)),
    module("bool input, lazy", "LazyBatchNorm1d", (), x=np.ones((4, 3), bool)),
    module("complex input", "BatchNorm1d", x=np.ones((4, 3), np.complex64)),
    *[
        module(
            f"{name} input, {module_dtype} module",
            "BatchNorm2d",
            x=_data(SHAPE, half),
            dtype=np.dtype(module_dtype),
            train=train,
        )
        for name, half in HALVES.items()
        for module_dtype in ("float32", half)
        for train in (True, False)
    ],  # fmt: skip
    # -- SyncBatchNorm calls (one rank): the same checks, but the batch size over all ranks --
    module("sync eps=0 train", "SyncBatchNorm", x=(4, 3, 2), kwargs={"eps": 0.0}),
    module("sync eps=0 (int) train", "SyncBatchNorm", kwargs={"eps": 0}),
    module("sync eps=-1 train", "SyncBatchNorm", kwargs={"eps": -1.0}, x=(2, 3, 2, 2)),
    module("sync eps=-1 eval", "SyncBatchNorm", kwargs={"eps": -1.0}, train=False),
    module("sync eps=0 eval", "SyncBatchNorm", kwargs={"eps": 0.0}, train=False),
    module("sync eps=nan train", "SyncBatchNorm", kwargs={"eps": NAN}),
    module("sync eps='a' train", "SyncBatchNorm", kwargs={"eps": "a"}),
    module("sync eps=None train", "SyncBatchNorm", kwargs={"eps": None}),
    module("sync eps=-1 empty batch", "SyncBatchNorm", kwargs={"eps": -1.0}, x=(0, 3)),
    module("sync momentum='a' train", "SyncBatchNorm", kwargs={"momentum": "a"}),
    module(
        "sync momentum='a' without running stats",
        "SyncBatchNorm",
        kwargs={"momentum": "a", "track_running_stats": False},
    ),
    module("sync momentum=Fraction train", "SyncBatchNorm", kwargs={"momentum": Fraction(1, 2)}),
    module("sync momentum=1.5 train", "SyncBatchNorm", kwargs={"momentum": 1.5}, warm=(4, 3)),
    module("sync momentum=None train", "SyncBatchNorm", kwargs={"momentum": None}, warm=(4, 3)),
    module("sync momentum=np.float32 train", "SyncBatchNorm", kwargs={"momentum": np.float32(0.5)}),
    module("sync momentum='a' eval", "SyncBatchNorm", kwargs={"momentum": "a"}, train=False),
    module("sync 1-D input", "SyncBatchNorm", x=(4,)),
    module("sync zero channels", "SyncBatchNorm", (0,), {"affine": False}, x=(4, 0)),
    module("sync channel count 4 vs 3 train", "SyncBatchNorm", x=(4, 4), warm=(4, 3)),
    module("sync empty batch train", "SyncBatchNorm", x=(0, 3, 2), warm=(4, 3, 2)),
    module("sync int64 input", "SyncBatchNorm", x=np.ones((4, 3), np.int64)),
    module(
        "sync float64 input, float32 module",
        "SyncBatchNorm",
        x=_data((4, 3), np.float64),
        deviation=MODULE_DTYPE,
        translate=_explained("SyncBatchNorm", np.float32, np.float64),
    ),
    module(
        "sync one value per channel train",
        "SyncBatchNorm",
        x=(1, 3, 1),
        deviation=OVER_ALL_RANKS,
        translate=lambda message: _size_as_tuple(message) + " over all ranks",
    ),
    module(
        "sync eps before one value per channel",
        "SyncBatchNorm",
        kwargs={"eps": -1.0},
        x=(1, 3),
        deviation="SyncBatchNorm counts the values per channel over all ranks, after the "
        "exchange, so it checks the other arguments first",
        expect=(ValueError, "batch_norm eps must be positive during training, but got -1.0"),
    ),
    # -- functional: argument types -------------------------------------------------------
    functional("training=None", training=None),
    functional("training=1", training=1),
    functional("training='yes'", training="yes"),
    functional("training=np.True_", training=np.True_),
    functional("training=0 on an empty batch", x=(0, 3), training=0),
    functional("momentum=None", momentum=None),
    functional("momentum=None in eval", momentum=None, training=False),
    functional("momentum='a'", momentum="a"),
    functional("momentum=Fraction", momentum=Fraction(1, 2)),
    functional("momentum=0-d array", momentum=np.array(0.1)),
    functional("momentum=np.float16", momentum=np.float16(0.5)),
    functional("momentum=np.int64(1)", momentum=np.int64(1)),
    functional("momentum=1.5", momentum=1.5),
    functional("momentum=-1", momentum=-1),
    functional("momentum=nan", momentum=NAN),
    functional("eps=0 train", eps=0.0),
    functional("eps=0 train, constant input", x=np.ones((4, 3), np.float32), eps=0.0),
    functional("eps=0 eval", eps=0.0, training=False),
    functional("eps=-1 eval", eps=-1.0, training=False),
    functional("eps=-1 train without running stats", rm=None, rv=None, eps=-1.0),
    functional("eps='a' eval", eps="a", training=False),
    functional("eps=Fraction", eps=Fraction(1, 1000)),
    functional("eps=0-d array", eps=np.array(1e-3)),
    functional("eps=np.float32", eps=np.float32(1e-3)),
    functional("training=None, eps=-1", training=None, eps=-1.0),
    # -- functional: running statistics ------------------------------------------------------
    functional("train without running stats", rm=None, rv=None),
    functional("train with running_mean only", rv=None),
    functional("train with running_var only", rm=None),
    functional("eval without running stats", rm=None, rv=None, training=False),
    functional("eval with running_mean only", rv=None, training=False),
    functional("eval with running_var only", rm=None, training=False),
    functional("train, running_mean only, of the wrong size", rm=4, rv=None),
    functional("eval, running_var only, of the wrong size", rm=None, rv=4, training=False),
    # -- functional: sizes ---------------------------------------------------------------------
    functional("running_mean of 4", rm=4),
    functional("running_var of 2, eval", rv=2, training=False),
    functional("weight of 2", w=2),
    functional("bias of 4", w=3, b=4),
    functional("running_var and weight wrong, eval", rv=2, w=1, training=False),
    functional("weight of 1, no running stats", rm=None, rv=None, w=1, b=1),
    functional("weight (3, 1)", w=(3, 1), b=(1, 3)),
    functional("weight (3, 1) eval, 3D input", x=(2, 3, 4), w=(3, 1), b=(1, 3, 1), training=False),
    functional("weight 0-d, one channel", x=(4, 1), rm=1, rv=1, w=np.array(2.0, np.float32)),
    functional("running_mean (3, 1)", rm=(3, 1)),
    functional("running_var (1, 3) eval", rv=(1, 3), training=False),
    functional("running_mean 0-d, one channel", x=(4, 1), rm=np.array(0.0, np.float32), rv=1),
    functional("running_mean (3, 1) and running_var of 2", rm=(3, 1), rv=2),
    # -- functional: dtypes ----------------------------------------------------------------------
    functional("weight float64", w=np.ones(3)),
    functional("bias float64 after a float32 weight", w=3, b=np.zeros(3)),
    functional("running_mean float64", rm=np.zeros(3)),
    functional("running_mean float64 eval, weight float32", rm=np.zeros(3), w=3, training=False),
    functional("running stats int64, weight float32", rm=np.zeros(3, np.int64), w=3),
    functional("running_var int32, weight float32", rv=np.ones(3, np.int32), w=3),
    functional("running_var uint8, weight float32", rv=np.ones(3, np.uint8), w=3),
    functional("running_mean complex", rm=np.zeros(3, np.complex64)),
    functional(
        "bias float64 and running_mean float16, train",
        w=3,
        b=np.zeros(3),
        rm=np.zeros(3, np.float16),
    ),
    functional(
        "bias float64 and running_mean float16, eval",
        w=3,
        b=np.zeros(3),
        rm=np.zeros(3, np.float16),
        training=False,
    ),
    functional("float64 input, everything float32", x=_data((4, 3), np.float64), w=3, b=3),
    functional(
        "float64 input, running_mean float64, rest float32",
        x=_data((4, 3), np.float64),
        rm=np.zeros(3),
        w=3,
        b=3,
    ),
    functional("running_mean (3, 1) float64 after a float32 weight", rm=np.zeros((3, 1)), w=3),
    functional("running_var float64 (3, 1) eval", rv=np.ones((3, 1)), w=3, training=False),
    *[
        functional(f"{np.dtype(dtype).name} input", x=np.ones((4, 3), dtype), rm=None, rv=None)
        for dtype in (
            np.int64,
            np.int32,
            np.int16,
            np.int8,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            bool,
            np.complex64,
            np.complex128,
        )
    ],
    functional(
        "int64 input, eval without running stats",
        x=np.ones((4, 3), np.int64),
        rm=None,
        rv=None,
        training=False,
    ),
    # -- functional: 16-bit float input, with float32 or its own parameters only -------------
    *[
        functional(
            f"{name} input, {label}",
            x=_data((4, 3), half),
            training=training,
            **{key: dtype and _vec(3, fill, dtype) for key, (fill, dtype) in vectors.items()},
        )
        for name, half in HALVES.items()
        for label, vectors in {
            "float32 parameters": {"rm": (0.5, np.float32), "w": (1.5, np.float32)},
            "its own parameters": {
                "rm": (0.5, half),
                "rv": (2.0, half),
                "w": (1.5, half),
                "b": (-0.5, half),
            },
            "float64 parameters": {"rm": (0.5, np.float64), "rv": (2.0, np.float64)},
            "float32 weight, running_mean its own": {"w": (1.5, np.float32), "rm": (0.5, half)},
            "its own weight, float32 bias": {"w": (1.5, half), "b": (0.5, np.float32)},
            "no running stats": {"rm": (0.0, None), "rv": (0.0, None)},
        }.items()
        for training in (True, False)
        if training or "no running" not in label
    ],
    *[
        functional(
            f"float32 input, {name} running stats", rm=_vec(3, 0.5, half), rv=_vec(3, 2.0, half)
        )
        for name, half in HALVES.items()
    ],  # fmt: skip
    # -- functional: the order of the checks ---------------------------------------------------
    functional(
        "one value per channel before a wrong running_mean",
        x=(1, 3),
        rm=4,
        deviation=SIZE_TUPLE,
        translate=_size_as_tuple,
    ),
    functional(
        "one value per channel before eps",
        x=(1, 3, 1),
        eps=-1.0,
        deviation=SIZE_TUPLE,
        translate=_size_as_tuple,
    ),
    functional("eps before a wrong running_mean", rm=4, eps=-1.0),
    functional(
        "eps before the input dtype", x=np.ones((4, 3), np.int64), eps=-1.0, rm=None, rv=None
    ),
    functional("momentum type before sizes", rm=4, momentum="a"),
    functional("sizes before the input dtype", x=np.ones((4, 3), np.int64), rm=4),
    functional("running stats pair before the input dtype", x=np.ones((4, 3), np.int64), rv=None),
    functional("running stats pair before parameter dtypes", rm=np.zeros(3), rv=None),
    functional("input dtype before parameter dtypes", x=np.ones((4, 3), np.int64), w=np.ones(3)),
    functional("parameter dtypes before rank", rm=(3, 1), w=np.ones(3)),
    # -- functional: empty batches (ATen returns before its other checks) ---------------------
    functional("empty batch", x=(0, 3)),
    functional("empty batch eval", x=(0, 3), training=False),
    functional(
        "empty batch eval without running stats", x=(0, 3), rm=None, rv=None, training=False
    ),
    functional("empty batch, running_mean only", x=(0, 3), rv=None),
    functional("empty batch, running stats of 4", x=(0, 3), rm=4, rv=4),
    functional("empty batch, running_mean (3, 1)", x=(0, 3), rm=(3, 1), rv=(3, 1)),
    functional("empty batch, float64 weight", x=(0, 3), w=np.ones(3)),
    functional("empty batch, eps=-1", x=(0, 3), eps=-1.0),
    functional("empty channels", x=(4, 0), rm=0, rv=0),
    functional("empty spatial", x=(2, 3, 0)),
    functional("one sample, empty spatial", x=(1, 3, 0)),
    functional(
        "empty batch of int64",
        x=np.ones((0, 3), np.int64),
        rm=None,
        rv=None,
        deviation="numbabn checks the input dtype even when there is nothing to normalise",
        expect=(NotImplementedError, "\"batch_norm\" not implemented for 'Long'"),
    ),
    functional(
        "zero channels with a weight",
        x=(4, 0),
        rm=None,
        rv=None,
        w=0,
        deviation="PyTorch's empty-input path reads weight[0] and fails on a zero-channel "
        "weight; an empty output is well defined",
    ),
    # -- functional: ranks and non-arrays (numbabn's own errors) --------------------------------
    functional(
        "1-D input",
        x=(3,),
        deviation=BELOW_2D,
        expect=(ValueError, "expected at least 2D input (got 1D input)"),
    ),
    functional(
        "0-D input",
        x=np.array(1.0, np.float32),
        rm=None,
        rv=None,
        deviation=BELOW_2D,
        expect=(ValueError, "expected at least 2D input (got 0D input)"),
    ),
    functional(
        "list input",
        x=[[1.0, 2.0], [3.0, 4.0]],
        rm=2,
        rv=2,
        deviation=NOT_AN_ARRAY,
        expect=(TypeError, f"input: {LIST_ERROR}"),
    ),
    functional(
        "list weight",
        w=[1.0, 1.0, 1.0],
        deviation=NOT_AN_ARRAY,
        expect=(TypeError, f"weight: {LIST_ERROR}"),
    ),
]


def _outcome(call: Callable[[], Any]) -> tuple[type[BaseException] | None, Any]:
    try:
        return None, call()
    except Exception as error:  # the row compares whatever was raised
        return type(error), error


def _snapshot(watched: Any, device: Device) -> Any:
    if watched is None:
        return None
    if isinstance(watched, tuple):
        return [None if a is None else np.array(device.get(a), copy=True) for a in watched]
    return snapshot(watched)


def _assert_unchanged(before: Any, watched: Any, lazy_class: type | None, device: Device) -> None:
    if watched is None:
        return
    if isinstance(watched, tuple):
        for old, new in zip(before, watched, strict=True):
            if old is not None:
                new = np.asarray(device.get(new))
                assert old.dtype == new.dtype and old.tobytes() == new.tobytes()
        return
    assert_same_state(before, watched)
    if lazy_class is not None:
        assert type(watched) is lazy_class and watched.num_features == 0


def _assert_same_results(theirs: Any, ours: Any, device: Device) -> None:
    if theirs is None:  # construction
        assert ours is None
        return
    for t, o in zip(theirs, ours, strict=True):
        t = _host(t)
        if t is None:
            assert o is None
            continue
        o = np.asarray(device.get(o))
        assert o.shape == tuple(t.shape) and o.dtype == t.dtype
        if o.dtype.itemsize == 2:
            # 16-bit floats: PyTorch rounds the statistics to them too (test_half.py
            # shows numbabn's results the nearer to the exact ones).
            o, t = o.astype(np.float64), t.astype(np.float64)
            atol = 2**-6 * np.abs(t).max(initial=1.0)
            np.testing.assert_allclose(o, t, rtol=2**-6, atol=atol, equal_nan=True)
        else:
            np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_same_check_as_pytorch(case: Case, device: Device) -> None:
    if device.name != "cpu" and case.cpu_only:
        pytest.skip(case.cpu_only)
    their_error, their_value = _outcome(case.theirs)
    call, watched = case.ours(device)
    lazy_class = type(watched) if type(watched).__name__.startswith("Lazy") else None
    before = _snapshot(watched, device)
    with warnings.catch_warnings():
        if device.simulated:  # its kernels run on NumPy scalars, which warn on inf * 0
            warnings.filterwarnings("ignore", ".* encountered in", RuntimeWarning)
        our_error, our_value = _outcome(call)

    if case.deviation is not None and case.expect is not None:
        assert our_error is case.expect[0], our_value
        assert str(our_value).startswith(case.expect[1])
    elif case.deviation is not None and case.translate is None:
        # numbabn accepts what PyTorch refuses by accident; the result must be sound.
        assert their_error is not None, "PyTorch accepts this now: drop the deviation"
        assert our_error is None, our_value
        return
    elif their_error is None:
        assert our_error is None, f"numbabn raised {our_error.__name__}: {our_value}"
        _assert_same_results(their_value, our_value, device)
        return
    else:
        message = str(their_value)
        if case.translate is not None:
            message = case.translate(message)
        assert our_error is their_error, f"{our_error}: {our_value} vs PyTorch's {message}"
        assert_pytorch_message_then_advice(str(our_value), message)
    _assert_unchanged(before, watched, lazy_class, device)


@pytest.mark.parametrize(
    ("kind", "shape", "axes"),
    [("BatchNorm2d", (2, 5, 6, 3), (0, 3, 1, 2)), ("BatchNorm1d", (2, 7, 3), (0, 2, 1))],
)
def test_channels_last_data_is_told_the_transpose_that_works(kind, shape, axes) -> None:
    bn = getattr(numbabn, kind)(3)
    x = _data(shape)
    with pytest.raises(RuntimeError) as raised:
        bn(x)
    assert f"pass x.transpose({', '.join(map(str, axes))})" in str(raised.value)
    y = bn(x.transpose(axes))
    assert y.shape == x.transpose(axes).shape and np.shares_memory(x, x.transpose(axes))


def test_every_deviation_says_why() -> None:
    for case in CASES:
        if case.expect is not None or case.translate is not None:
            assert case.deviation, case.id


def test_backward_gives_gradients_in_the_weights_shape(rng) -> None:
    """A weight of shape (C, 1), which PyTorch's forward takes, gets gradients of that shape.

    (PyTorch's own backward then fails; the gradients are those of the flat weight.)
    """
    x = rng.standard_normal((4, 3, 2))
    weight, bias = rng.uniform(0.5, 1.5, (3, 1)), rng.uniform(-1, 1, (3, 1))
    dy = rng.standard_normal(x.shape)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(weight.ravel()).requires_grad_()
    tb = torch.from_numpy(bias.ravel()).requires_grad_()
    TF.batch_norm(tx, None, None, tw, tb, training=True).backward(torch.from_numpy(dy))
    _, saved = F.batch_norm_forward(x, None, None, weight, bias, training=True)
    dx, dw, db = F.batch_norm_backward(dy, x, saved, weight, bias=bias)
    assert dw.shape == weight.shape and db.shape == bias.shape
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw.ravel(), tw.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db.ravel(), tb.grad.numpy(), rtol=1e-9, atol=1e-9)
