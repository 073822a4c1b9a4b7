"""Checks shared by the functional API and the modules, with PyTorch's error texts.

The checks run in PyTorch's order, so a call with several faults reports the
one PyTorch would: the batch size and ``eps`` first (``F.batch_norm``), then
the argument types, then the channel counts, the presence of the running
statistics, the input dtype and the parameter dtypes (ATen's ``batch_norm``).

Each error keeps PyTorch's type and its text first (users and tests match on
it); where the cause is not obvious to a NumPy user, one sentence follows that
says what to do (:func:`_advised`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = np.dtype(np.float16)
_FLOAT = np.dtype(np.float32)


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16``, told by name: ``ml_dtypes`` defines
    NumPy's bfloat16, and only users with such data need to have imported it."""
    return getattr(dtype, "name", None) == "bfloat16" and getattr(dtype, "itemsize", 0) == 2


def is_half(dtype: Any) -> bool:
    """Whether ``dtype`` is a 16-bit float: float16 or bfloat16."""
    return dtype == _HALF or is_bfloat16(dtype)


class HalfParamDtypes(dict[np.dtype, np.dtype]):
    """Input dtype -> dtype of the parameters a float32 module has for it, with bfloat16
    too (matched by name, see :func:`is_bfloat16`).

    A backend with this table takes bfloat16 and float16 input, with float32
    parameters and statistics or with parameters of the input's own dtype (a
    module converted with ``.bfloat16()`` or ``.half()``), as PyTorch's CPU does.
    """

    def __contains__(self, dtype: object) -> bool:
        return super().__contains__(dtype) or is_bfloat16(dtype)

    def __missing__(self, dtype: Any) -> np.dtype:
        if is_bfloat16(dtype):
            return _FLOAT
        raise KeyError(dtype)

    def get(self, dtype: Any, default: Any = None) -> Any:
        try:
            return self[dtype]
        except KeyError:
            return default


# Input dtype -> parameter dtype, per kind of data a backend may take: float32 and
# float64 data keep parameters of their own dtype, float16 data float32 ones.
FLOAT_PARAM_DTYPES: dict[np.dtype, np.dtype] = {dtype: dtype for dtype in SUPPORTED_DTYPES}
HALF_PARAM_DTYPES: dict[np.dtype, np.dtype] = {_HALF: _FLOAT}
# The CPU's: float32, float64, float16 and bfloat16 data, half data with float32 or half
# parameters. Every dtype a backend takes is a key here.
PARAM_DTYPES = HalfParamDtypes(FLOAT_PARAM_DTYPES | HALF_PARAM_DTYPES)
# PyTorch's names of the scalar types that NumPy has too, as its messages spell them.
_TORCH_NAMES = {
    np.dtype(np.bool_): "Bool",
    np.dtype(np.uint8): "Byte",
    np.dtype(np.int8): "Char",
    np.dtype(np.int16): "Short",
    np.dtype(np.uint16): "UInt16",
    np.dtype(np.int32): "Int",
    np.dtype(np.uint32): "UInt32",
    np.dtype(np.int64): "Long",
    np.dtype(np.uint64): "UInt64",
    _HALF: "Half",
    "bfloat16": "BFloat16",
    _FLOAT: "Float",
    np.dtype(np.float64): "Double",
    np.dtype(np.complex64): "ComplexFloat",
    np.dtype(np.complex128): "ComplexDouble",
}
# What PyTorch's argument parser takes for a ``float`` argument.
_FLOAT_LIKE = (float, int, np.floating, np.integer, np.bool_)
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python


def param_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of the parameters and statistics for input of ``dtype`` (float32 for float16)."""
    return PARAM_DTYPES[dtype]


def type_name(value: Any) -> str:
    """The type's name as CPython's ``tp_name`` spells it: ``str``, ``numpy.float64``."""
    kind = type(value)
    if kind.__module__ == "builtins" or kind.__flags__ & _HEAPTYPE:
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def _advised(pytorch_text: str, advice: str) -> str:
    """PyTorch's text, then numbabn's sentence for a NumPy user."""
    return f"{pytorch_text}. {advice}"


def torch_dtype_name(dtype: np.dtype) -> str:
    """PyTorch's name of ``dtype`` (``Float``, ``Long``), or NumPy's where PyTorch has none."""
    dtype = np.dtype(dtype)
    return _TORCH_NAMES.get("bfloat16" if is_bfloat16(dtype) else dtype, dtype.name)


# -- construction --------------------------------------------------------------------


def check_num_features(num_features: Any, factory: str) -> int:
    """``num_features`` as an int, or PyTorch's error from ``torch.<factory>(num_features)``.

    ``factory`` is ``"empty"`` when the module has affine parameters (PyTorch
    allocates them first) and ``"zeros"`` when it has only running statistics.
    """
    if isinstance(num_features, (list, tuple)):
        # PyTorch takes a size list here (a module of that shape); numbabn takes a count.
        raise TypeError(f"num_features must be an int, got {type_name(num_features)}")
    if isinstance(num_features, (bool, np.bool_)):
        count = None
    else:
        try:
            count = operator.index(num_features)
        except TypeError:
            count = None
    if count is None:
        raise TypeError(
            _advised(
                f"{factory}(): argument 'size' (position 1) must be tuple of ints, "
                f"not {type_name(num_features)}",
                f"num_features is the number of channels (axis 1 of the input) and must be an "
                f"int, such as 3; got {num_features!r}",
            )
        )
    if count < 0:
        advice = f"num_features is the number of channels and cannot be negative; got {count}"
        if factory == "zeros":
            raise RuntimeError(f"zeros: Dimension size must be non-negative. {advice}")
        raise RuntimeError(
            _advised(f"Trying to create tensor with negative dimension {count}: [{count}]", advice)
        )
    return count


# -- call: F.batch_norm's own checks ----------------------------------------------------


def check_ndim(x: Any, allowed: tuple[int, ...], label: str) -> None:
    """Raise PyTorch's ``expected 4D input (got 3D input)`` unless ``x.ndim`` is allowed."""
    if x.ndim not in allowed:
        raise ValueError(f"expected {label} input (got {x.ndim}D input)")


def check_batch_size(x: Any) -> None:
    """Raise PyTorch's error when training would see one value per channel."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def check_eps(eps: Any, training: Any) -> None:
    """Raise PyTorch's ValueError for ``eps <= 0`` in training and ``eps < 0`` otherwise.

    The comparisons are PyTorch's, so an ``eps`` that cannot be compared with a
    float raises the same TypeError. NaN passes, as in PyTorch.
    """
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_scalar_args(training: Any, momentum: Any, eps: Any) -> None:
    """Raise PyTorch's TypeError unless ``training`` is a bool and the others are floats."""
    if not isinstance(training, bool):
        raise TypeError(
            "batch_norm(): argument 'training' (position 6) must be bool, "
            f"not {type_name(training)}"
        )
    for name, position, value in (("momentum", 7, momentum), ("eps", 8, eps)):
        if not isinstance(value, _FLOAT_LIKE):
            raise TypeError(
                f"batch_norm(): argument '{name}' (position {position}) must be float, "
                f"not {type_name(value)}"
            )


# -- call: ATen's checks ------------------------------------------------------------------


def channel_vectors(
    x: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
    training: bool,
) -> tuple[Any | None, Any | None]:
    """Check the per-channel arrays' sizes and presence; return weight and bias as ``(C,)``.

    Like PyTorch, a size is a number of elements: a weight or bias of shape
    ``(C, 1)`` is used as ``(C,)`` (running statistics must be 1-D; see
    :func:`check_param_dtypes`).
    """
    n_channels = x.shape[1]
    for name, vector in (("running_mean", running_mean), ("running_var", running_var)):
        if vector is not None:
            check_channel_count(name, vector, x)
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    for name, vector in (("weight", weight), ("bias", bias)):
        if vector is not None:
            check_channel_count(name, vector, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    return flat_vector(weight, n_channels), flat_vector(bias, n_channels)


def check_channel_count(name: str, vector: Any, x: Any) -> None:
    """Raise PyTorch's ``weight should contain 3 elements not 4`` on a wrong channel count.

    The sentence added says where numbabn found the channels, and, when the
    input's last axis has the vector's size (channels-last data, ``(N, H, W, C)``),
    the transpose that views it as ``(N, C, H, W)`` without a copy.
    """
    n_channels = x.shape[1]
    if vector.size == n_channels:
        return
    shape = tuple(x.shape)
    advice = (
        f"numbabn takes the channels from axis 1 of the input, which has shape {shape}: "
        f"{n_channels} there, where {name} has {vector.size}"
    )
    if x.ndim >= 3 and shape[-1] == vector.size:
        axes = ", ".join(map(str, (0, x.ndim - 1, *range(1, x.ndim - 1))))
        advice += (
            f"; the last axis has {vector.size}: for channels-last data pass "
            f"x.transpose({axes}), a view that copies nothing"
        )
    raise RuntimeError(
        _advised(f"{name} should contain {n_channels} elements not {vector.size}", advice)
    )


def flat_vector(vector: Any | None, n_channels: int) -> Any | None:
    """``vector`` (``n_channels`` elements, any shape) as shape ``(n_channels,)``."""
    if vector is None or vector.shape == (n_channels,):
        return vector
    return vector.reshape(n_channels)


def check_dtype(x: Any, taken: Mapping[np.dtype, np.dtype] = PARAM_DTYPES) -> None:
    """Raise unless ``x`` has a dtype the backend takes: a key of ``taken``.

    ``taken`` is the backend's ``param_dtypes`` (both backends' :data:`PARAM_DTYPES`
    takes bfloat16 and float16 too). PyTorch's
    NotImplementedError for the dtypes it has a kernel name for; TypeError for a
    16-bit float the backend does not take and for dtypes PyTorch has no tensors of.
    """
    dtype = x.dtype
    if dtype in taken:
        return
    halves = "bfloat16 and float16" if isinstance(taken, HalfParamDtypes) else ""
    halves = halves or ("float16" if _HALF in taken else "")
    supported = "float32 and float64" + (f" (and {halves})" if halves else "")
    if is_half(dtype):
        raise TypeError(
            f"input has dtype {dtype}, which this backend does not take: it takes {supported}. "
            "Convert it with x.astype(np.float32), or pass a host array (NumPy, or a PyTorch "
            "CPU tensor): the CPU backend takes bfloat16 and float16"
        )
    if dtype in _TORCH_NAMES:
        raise NotImplementedError(
            _advised(
                f"\"batch_norm\" not implemented for '{_TORCH_NAMES[dtype]}'",
                f"numbabn takes {supported} input, not {dtype}: convert it with "
                "x.astype(np.float32)",
            )
        )
    raise TypeError(f"input has dtype {x.dtype}; numbabn supports {supported}")


def check_param_dtypes(
    x: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
    training: bool,
    taken: Mapping[np.dtype, np.dtype] = PARAM_DTYPES,
) -> None:
    """Raise PyTorch's RuntimeError when a parameter's dtype or a statistic's rank is wrong.

    As in PyTorch's CPU kernels: when the first of weight, bias, running_mean,
    running_var that is given has the input's dtype, each of the others must
    too (``expected scalar type Float but found Double``); otherwise every one
    must be float32 and the input bfloat16 or float16 (``mixed dtype (CPU): ...``).
    Parameters of the input's 16-bit dtype need a backend whose ``param_dtypes``
    (``taken``) is a :class:`HalfParamDtypes`, as the CPU's is. The
    running statistics must be 1-D (``TensorAccessor expected 1 dims but
    tensor has 2``). The order is the kernels' order of reading them.
    """
    given = [vector for vector in (weight, bias, running_mean, running_var) if vector is not None]
    if not given:
        return
    if given[0].dtype != x.dtype:  # PyTorch's "mixed type": float32 parameters for float16
        if any(vector.dtype != _FLOAT for vector in given):
            raise _param_dtype_error(
                "mixed dtype (CPU): expect parameter to have scalar type of Float", x.dtype
            )
        if not is_half(x.dtype):
            raise _param_dtype_error(
                "mixed dtype (CPU): all inputs must share same datatype.", x.dtype
            )
        for vector in (running_mean, running_var):
            _check_rank(vector)
        return
    order = (running_mean, running_var, bias) if training else (bias, running_mean, running_var)
    for vector in order:
        if vector is None:
            continue
        dtype = vector.dtype
        if vector is not bias:
            _check_rank(vector)
        if dtype != x.dtype:
            raise _param_dtype_error(
                f"expected scalar type {torch_dtype_name(x.dtype)} "
                f"but found {torch_dtype_name(dtype)}",
                x.dtype,
            )
    if is_half(x.dtype) and not isinstance(taken, HalfParamDtypes):
        raise TypeError(
            f"{x.dtype} input takes float32 weight, bias and running statistics on this "
            "backend, as in PyTorch's mixed precision; convert them with .astype(np.float32)"
        )


def _param_dtype_error(text: str, dtype: np.dtype) -> RuntimeError:
    """PyTorch's RuntimeError for a parameter dtype, then what to do for ``dtype`` input.

    The error keeps PyTorch's own text as ``pytorch_text``, so that a module can give
    its own advice after it instead.
    """
    wanted = PARAM_DTYPES.get(dtype)
    advice = ""
    if wanted is not None:
        advice = (
            f"{'' if text.endswith('.') else '.'} weight, bias, running_mean and running_var "
            f"must be {wanted} for {dtype} input: convert them with .astype(np.{wanted}), "
            "or convert the input"
        )
    error = RuntimeError(text + advice)
    error.param_dtype_mismatch = True  # type: ignore[attr-defined]
    error.pytorch_text = text  # type: ignore[attr-defined]
    return error


def is_param_dtype_error(error: BaseException) -> bool:
    """Whether ``error`` is :func:`check_param_dtypes`'s dtype error (not a rank error)."""
    return getattr(error, "param_dtype_mismatch", False)


def _check_rank(vector: Any | None) -> None:
    if vector is not None and vector.ndim != 1:
        raise RuntimeError(f"TensorAccessor expected 1 dims but tensor has {vector.ndim}")


# -- numbabn's own arrays ---------------------------------------------------------------


def check_channel_vector(name: str, vector: Any | None, x: Any) -> None:
    """Check a per-channel vector against ``x``: ``C`` elements, the parameter dtype (or, for
    16-bit float input, the input's own)."""
    if vector is None:
        return
    check_channel_count(name, vector, x)
    expected = PARAM_DTYPES.get(x.dtype)
    if vector.dtype != expected and not (is_half(x.dtype) and vector.dtype == x.dtype):
        raise TypeError(
            f"{name} has dtype {vector.dtype} but the input has dtype {x.dtype}; "
            f"{name} must be {expected}"
        )


def check_like(name: str, array: Any, x: Any, x_name: str = "input") -> None:
    """Check that ``array`` has the shape and dtype of ``x``."""
    if array.shape != x.shape:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)} but {x_name} has shape {tuple(x.shape)}; "
            "they must match"
        )
    if array.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {array.dtype} but {x_name} has dtype {x.dtype}; they must match"
        )


def check_out(out: Any | None, x: Any) -> None:
    """Check an ``out=`` array: same shape and dtype as ``x``, writeable."""
    if out is None:
        return
    check_like("out", out, x)
    check_writeable("out", out)


def writeable(array: Any) -> bool:
    """Whether ``array`` may be written: NumPy arrays say so in their flags; device arrays
    whose exporter marked them read-only in the CUDA Array Interface carry
    ``writeable = False``."""
    if isinstance(array, np.ndarray):
        return bool(array.flags.writeable)
    return bool(getattr(array, "writeable", True))


def check_writeable(name: str, array: Any, why: str = "") -> None:
    """Raise ValueError if ``array`` is read-only (``why`` says who writes it)."""
    if not writeable(array):
        raise ValueError(f"{name} is read-only{why}; pass a writeable array")


def check_running_writeable(training: bool, running_mean: Any, running_var: Any) -> None:
    """Raise ValueError if training would update a read-only running statistic."""
    if training:
        for name, running in (("running_mean", running_mean), ("running_var", running_var)):
            check_writeable(name, running, ": training updates it in place")
