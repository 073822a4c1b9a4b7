"""Every CUDA kernel specialisation numbabn launches, with its Numba argument types.

The table that the offline compile of :mod:`tools.bench.gpu_static` reads:
for one input dtype, each kernel of :mod:`numbabn._cuda.kernels` that the
backend launches, with the argument types it launches it with. Data arrays have
the input's dtype; parameters, running statistics and parameter gradients are
float32 for bfloat16 and float16 input (a float32 module) and the input's dtype
otherwise; per-channel statistics, coefficients and partials are float64. For
16-bit input the kernels that write parameter-dtype arrays (running
statistics, parameter gradients) come a second time with parameters of the
input's dtype (a module converted with ``.bfloat16()`` or ``.half()``),
labelled ``half parameters``: their stores round to 16 bits there. (A kernel
that only reads parameters widens each once, as it widens the data.) Arrays
are typed ``"A"`` (any strides), the general case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from numba.cuda import types

from numbabn._cuda import kernels
from numbabn._cuda.kernels import Family, Mode

FAMILIES = {
    "rows": Family.ROWS,
    "wide_rows": Family.WIDE_ROWS,
    "planar": Family.PLANAR,
    "channels_inner": Family.CHANNELS_INNER,
}
EVERY = tuple(FAMILIES)
# Through the forward's ReLU, the operands of planar views are staged as rows, and the
# passes that rebuild the mask take the rows kernels for wide rows too.
MASKED = ("rows", "channels_inner")
# The passes that store take the rows kernels for wide rows (kernels._flat_storing).
STORING = ("rows", "planar", "channels_inner")
# The scaled gradient follows a ReLU with a residual: never over a planar view.
NOT_PLANAR = ("rows", "channels_inner")

# What the backend launches of each factory: the flags and the families.
SUMS = {  # (through the forward's ReLU, with its residual)
    "": ((False, False), EVERY),
    "masked": ((True, False), MASKED),
    "masked, residual": ((True, True), MASKED),
}
PASSES = {  # (mode, residual, ReLU)
    "affine": ((Mode.AFFINE, False, False), STORING),
    "affine, relu": ((Mode.AFFINE, False, True), STORING),
    "affine, residual": ((Mode.AFFINE, True, False), STORING),
    "affine, residual, relu": ((Mode.AFFINE, True, True), STORING),
    "gradient": ((Mode.GRADIENT, False, False), STORING),
    "masked gradient": ((Mode.MASKED_GRADIENT, False, False), MASKED),
    "masked scale": ((Mode.MASKED_SCALE, False, False), MASKED),
    "scaled gradient": ((Mode.SCALED_GRADIENT, False, False), NOT_PLANAR),
}
EVALUATIONS = {  # (residual, ReLU)
    "": ((False, False), STORING),
    "relu": ((False, True), STORING),
    "residual": ((True, False), STORING),
    "residual, relu": ((True, True), STORING),
}


def _array(dtype: Any, ndim: int) -> Any:
    return types.Array(dtype, ndim, "A")


def _label(name: str, *flags: str) -> str:
    inside = ", ".join(flag for flag in flags if flag)
    return f"{name}[{inside}]" if inside else name


HALVES = (types.bfloat16, types.float16)
# The label flag of the kernels given parameters of the input's 16-bit dtype, and the
# kernels listed so: those that write parameter-dtype arrays.
HALF_PARAMETERS = "half parameters"
WRITE_PARAMETERS = ("statistics", "gradient_sums", "batch_coefficients", "accumulate")


def catalogue(dtype: Any) -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
    """``(label, kernel, argument types)`` of every kernel launched for inputs of ``dtype``.

    Parameters
    ----------
    dtype : numba type
        The input's dtype (:mod:`numba.cuda.types`): ``bfloat16``, ``float16``,
        ``float32`` or ``float64``.

    Returns
    -------
    list of tuple
        One entry per specialisation: its label, the kernel (a dispatcher: its
        ``py_func`` is compiled with its options, such as launch bounds) and
        the tuple of Numba types of its arguments.
    """
    if dtype not in HALVES:
        return _entries(dtype, dtype)
    with_half = [
        entry
        for entry in _entries(dtype, dtype, HALF_PARAMETERS)
        if entry[0].startswith(WRITE_PARAMETERS)
    ]
    return _entries(dtype, types.float32) + with_half


def _entries(
    dtype: Any, param: Any, flag: str = ""
) -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
    """:func:`catalogue`'s entries for input of ``dtype`` and parameters of ``param``, each
    label with ``flag``."""
    b, i64, f64 = types.boolean, types.int64, types.float64
    x, v = _array(dtype, 4), _array(param, 1)
    stats, coeffs, partials = _array(f64, 1), _array(f64, 2), _array(f64, 3)
    counters = _array(types.uint32, 1)
    # Data kernels take (channels_per_block, per_block) first.
    statistics = (i64, i64, x, v, v, v, v, b, f64, f64, coeffs, partials, counters)
    grads = _array(param, 2)
    sums = (i64, i64, x, x, x, stats, stats, v, v, b, coeffs, grads, partials, counters, x)
    elementwise = (i64, i64, x, x, x, coeffs, x)
    evaluation = (i64, i64, x, x, v, v, v, v, f64, coeffs, x)
    table: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
    for family_name, family in FAMILIES.items():
        table.append(
            (_label("statistics", family_name, flag), kernels.statistics(family), statistics)
        )
        for kernel, factory, variants, signature in (
            ("gradient_sums", kernels.gradient_sums, SUMS, sums),
            ("elementwise", kernels.elementwise, PASSES, elementwise),
            ("evaluation", kernels.evaluation, EVALUATIONS, evaluation),
        ):
            table += [
                (_label(kernel, family_name, name, flag), factory(family, *flags), signature)
                for name, (flags, families) in variants.items()
                if family_name in families
            ]
    return [
        *table,
        (_label("running_coefficients", flag), kernels.running_coefficients,
         (v, v, v, v, f64, coeffs)),
        (_label("batch_coefficients", flag), kernels.batch_coefficients,
         (stats, stats, i64, v, v, f64, v, v, b, f64, coeffs)),
        (_label("gradient_coefficients", flag), kernels.gradient_coefficients,
         (coeffs, i64, stats, stats, v, coeffs)),
        (_label("gradient_scale", flag), kernels.gradient_scale, (stats, v, coeffs)),
        (_label("accumulate", flag), kernels.accumulate, (v, v)),
        (_label("copy_5d", flag), kernels.copy_5d, (_array(dtype, 5), _array(dtype, 5))),
    ]  # fmt: skip
