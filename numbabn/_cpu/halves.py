"""16-bit floats on the CPU: bfloat16 and float16 data, carried as 16-bit integers.

Numba's CPU target has no 16-bit float type, so the kernels never see one: the
backend views bfloat16 data as ``uint16`` and float16 data as ``int16``
(:func:`as_bits`), and the integer type tells the compiled code which format
its bits hold. :func:`widen` turns an element into float64 in registers
(bfloat16: a 16-bit shift into a float32; float16: the processor's conversion,
``vcvtph2ps`` on x86 with F16C), and :func:`narrowed` rounds a float64 result to
the element type once, to nearest even: rounded to odd on two bits more than the
half type has, by integer operations on its bits, the second rounding is exact
(Boldo and Melquiond), and a float32 holds the intermediate exactly. Float32 and float64
operands pass through both unchanged, so one kernel source serves every dtype.

NumPy code of the backend reads and writes the same formats with :func:`widened`
and :func:`rounded` (NumPy's and ``ml_dtypes``' casts from float64 round once
too). ``ml_dtypes`` (which defines NumPy's bfloat16) is imported only when
bfloat16 data is met.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from numbabn._validation import is_bfloat16

__all__ = [
    "as_bits", "bits_dtype", "from_bits", "narrowed", "rounded", "widen", "widened", "zero_bound",
]  # fmt: skip

FLOAT16 = np.dtype(np.float16)
_BFLOAT16_BITS = np.dtype(np.uint16)
_FLOAT16_BITS = np.dtype(np.int16)


def bits_dtype(dtype: np.dtype) -> np.dtype | None:
    """The integer dtype that carries ``dtype``'s bits to the kernels; None for other floats."""
    if dtype == FLOAT16:
        return _FLOAT16_BITS
    if is_bfloat16(dtype):
        return _BFLOAT16_BITS
    return None


def bfloat16() -> np.dtype:
    """NumPy's bfloat16 dtype (``ml_dtypes.bfloat16``)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def as_bits(array: Any) -> Any:
    """``array`` (a NumPy array, or anything else) with 16-bit float data viewed as integers."""
    if isinstance(array, np.ndarray) and array.itemsize == 2:
        bits = bits_dtype(array.dtype)
        if bits is not None:
            return array.view(bits)
    return array


def from_bits(array: Any) -> Any:
    """The inverse of :func:`as_bits`: ``uint16`` arrays as bfloat16, ``int16`` as float16."""
    if isinstance(array, np.ndarray) and array.itemsize == 2:
        if array.dtype == _FLOAT16_BITS:
            return array.view(FLOAT16)
        if array.dtype == _BFLOAT16_BITS:
            return array.view(bfloat16())
    return array


def widened(array: np.ndarray) -> np.ndarray:
    """A float64 copy of ``array``: float data, or the bits :func:`as_bits` made of it."""
    return from_bits(array).astype(np.float64)


def rounded(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 ``values`` as ``dtype``, a float dtype or the bits of one, each rounded once.

    NumPy's casts (and ``ml_dtypes``' to bfloat16) round float64 once, to nearest even.
    """
    if dtype == _FLOAT16_BITS:
        return values.astype(FLOAT16).view(dtype)
    if dtype == _BFLOAT16_BITS:
        return values.astype(bfloat16()).view(dtype)
    return values.astype(dtype)


# -- compiled code ------------------------------------------------------------------------


def widen(value: Any) -> float:
    """An element of an operand as float64 (compiled code only)."""
    raise NotImplementedError  # stands in for Python; compiled code takes the overload


def narrowed(value: float, array: Any) -> Any:
    """Float64 ``value`` as an element of ``array``, rounded once (compiled code only)."""
    raise NotImplementedError


def zero_bound(like: Any) -> float:
    """The largest float64 that rounds to zero as an element like ``like`` (an array or an
    element): half the smallest subnormal of its type, 0 for float64 (compiled code only).

    The fused ReLU compares with it to see the output's sign and mask as PyTorch does,
    whose ReLU runs on the rounded value.
    """
    raise NotImplementedError


def _float32_of_bfloat16_typed(typingctx: Any, bits: Any) -> Any:
    """The bfloat16 whose bits are the uint16 ``bits``, as float32 (exact: its top half)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


def _float32_of_float16_typed(typingctx: Any, bits: Any) -> Any:
    """The float16 whose bits are the int16 ``bits``, as float32 (exact)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


def _odd(builder: Any, value: Any, precision: int) -> Any:
    """LLVM IR: the float64 ``value`` rounded to odd on ``precision`` significant bits.

    Cut toward zero on its bit pattern, with the last bit kept set where any bit
    cut was: five 64-bit integer operations, which vectorise four to a register
    (the processor's conversions, the costly part of a store, happen once). Exact
    values, infinities and zeros pass unchanged; a NaN stays a NaN.
    """
    i64 = ir.IntType(64)
    cut = 53 - precision
    low = ir.Constant(i64, (1 << cut) - 1)
    bits = builder.bitcast(value, i64)
    # ``low`` plus the cut bits carries into the last kept bit where any is set.
    sticky = builder.and_(builder.add(builder.and_(bits, low), low), ir.Constant(i64, 1 << cut))
    kept = builder.and_(builder.or_(bits, sticky), ir.Constant(i64, ~((1 << cut) - 1) % 2**64))
    return builder.bitcast(kept, ir.DoubleType())


def _bfloat16_of_float64_typed(typingctx: Any, value: Any) -> Any:
    """The float64 ``value`` rounded once to bfloat16 (nearest even), as its uint16 bits.

    Rounded to odd on 10 bits, which a float32 holds exactly (down to 2**-140;
    below, whatever the float32 rounding, the result is a zero), then to nearest
    even on bfloat16's 8 by the usual integer addition on the float32's bits. A
    NaN is cut instead: the addition could carry its payload into the sign.
    """

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        single = builder.fptrunc(_odd(builder, args[0], 10), ir.FloatType())
        bits = builder.bitcast(single, i32)
        last = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(bits, builder.add(ir.Constant(i32, 0x7FFF), last))
        rounded = builder.select(builder.fcmp_unordered("uno", single, single), bits, rounded)
        return builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), ir.IntType(16))

    return types.uint16(types.float64), codegen


def _float16_of_float64_typed(typingctx: Any, value: Any) -> Any:
    """The float64 ``value`` rounded once to float16 (nearest even), as its int16 bits.

    Rounded to odd on 13 bits, which a float32 holds exactly wherever the result
    is not a zero, then to float16 by the processor (``vcvtps2ph`` with F16C).
    """

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        single = builder.fptrunc(_odd(builder, args[0], 13), ir.FloatType())
        return builder.bitcast(builder.fptrunc(single, ir.HalfType()), ir.IntType(16))

    return types.int16(types.float64), codegen


_float32_of_bfloat16: Any = intrinsic(_float32_of_bfloat16_typed)
_float32_of_float16: Any = intrinsic(_float32_of_float16_typed)
_bfloat16_of_float64: Any = intrinsic(_bfloat16_of_float64_typed)
_float16_of_float64: Any = intrinsic(_float16_of_float64_typed)


@overload(widen, inline="always")
def _widen_overload(value):  # type: ignore[no-untyped-def]
    if value == types.uint16:
        return lambda value: np.float64(_float32_of_bfloat16(value))
    if value == types.int16:
        return lambda value: np.float64(_float32_of_float16(value))
    return lambda value: np.float64(value)


@overload(narrowed, inline="always")
def _narrowed_overload(value, array):  # type: ignore[no-untyped-def]
    if array.dtype == types.uint16:
        return lambda value, array: _bfloat16_of_float64(np.float64(value))
    if array.dtype == types.int16:
        return lambda value, array: _float16_of_float64(np.float64(value))
    return lambda value, array: value


# Half the smallest subnormal of each element type the kernels store (float64's is below
# every float64).
_ZERO_BOUNDS = {types.uint16: 2.0**-134, types.int16: 2.0**-25, types.float32: 2.0**-150}


@overload(zero_bound, inline="always")
def _zero_bound_overload(like):  # type: ignore[no-untyped-def]
    bound = _ZERO_BOUNDS.get(like.dtype if isinstance(like, types.Array) else like, 0.0)
    return lambda like: bound
