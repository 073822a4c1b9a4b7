"""16-bit floats on the CPU: bfloat16 and float16 data, carried as 16-bit integers.

Numba's CPU target has no 16-bit float type, so the kernels never see one: the
backend views bfloat16 data as ``uint16`` and float16 data as ``int16``
(:func:`as_bits`), and the integer type tells the compiled code which format
its bits hold. :func:`widen` turns an element into float64 in registers
(bfloat16: a 16-bit shift into a float32; float16: the processor's conversion,
``vcvtph2ps`` on x86 with F16C), and :func:`narrowed` rounds a float64 result to
the element type once, to nearest even: through a float32 rounded to odd, whose
13 or more spare bits make the second rounding exact (Boldo and Melquiond). Float32 and float64
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

__all__ = ["as_bits", "bits_dtype", "from_bits", "narrowed", "rounded", "widen", "widened"]

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


def _odd_float32(builder: Any, value: Any) -> Any:
    """LLVM IR: the bits (i32) of the float64 ``value`` rounded to odd as a float32.

    Rounded to nearest, then moved one step toward zero where that went away from
    ``value``, and given an odd last bit where inexact. The rounding error's sign
    and whether it is zero are read in float32, scaled by 2**60 so that no error
    underflows there where it matters (an infinite ``value`` gives a NaN error:
    no change). Every integer operation is 32 bits wide, so that loops of them
    vectorise eight to a register; Numba's own integer arithmetic would widen
    them to 64 bits.
    """
    f32, i32 = ir.FloatType(), ir.IntType(32)
    nearest = builder.fptrunc(value, f32)
    error = builder.fsub(value, builder.fpext(nearest, ir.DoubleType()))
    error = builder.fptrunc(builder.fmul(error, ir.Constant(ir.DoubleType(), 2.0**60)), f32)
    inexact = builder.zext(builder.fcmp_ordered("!=", error, ir.Constant(f32, 0.0)), i32)
    bits = builder.bitcast(nearest, i32)
    sign_differs = builder.lshr(
        builder.xor(builder.bitcast(error, i32), bits), ir.Constant(i32, 31)
    )
    toward_zero = builder.sub(bits, builder.and_(inexact, sign_differs))
    return builder.or_(toward_zero, inexact)


def _bfloat16_of_float64_typed(typingctx: Any, value: Any) -> Any:
    """The float64 ``value`` rounded once to bfloat16 (nearest even), as its uint16 bits."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        odd = _odd_float32(builder, args[0])
        last = builder.and_(builder.lshr(odd, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(odd, builder.add(ir.Constant(i32, 0x7FFF), last))
        return builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), ir.IntType(16))

    return types.uint16(types.float64), codegen


def _float16_of_float64_typed(typingctx: Any, value: Any) -> Any:
    """The float64 ``value`` rounded once to float16 (nearest even), as its int16 bits."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        odd = builder.bitcast(_odd_float32(builder, args[0]), ir.FloatType())
        return builder.bitcast(builder.fptrunc(odd, ir.HalfType()), ir.IntType(16))

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
