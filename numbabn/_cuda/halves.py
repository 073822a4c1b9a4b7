"""16-bit floats in the CUDA kernels: bfloat16 and float16 device arrays, as they are.

numba-cuda types a device array of ``ml_dtypes.bfloat16`` as its own bfloat16
type and one of float16 as float16, so the kernels take such arrays without
views. They read an element as float64 with numba-cuda's conversions, both
exact: bfloat16 is widened by a 16-bit shift into a float32, float16 by PTX's
``cvt.f64.f16``. They store a float64 result through :func:`narrowed`, which
rounds it once, to nearest even: float16 by PTX's ``cvt.rn.f16.f64`` (the
array's own conversion), bfloat16 by the CPU kernels' rounding (rounded to
odd on the float64's bits, then converted once, see :mod:`numbabn._cpu.halves`)
in integer and float32 operations that every compute capability has, where numba-cuda's own
bfloat16 conversion would call a C++ function. Float32 and float64 values are
stored as before: :func:`narrowed` leaves them as they are.

Under the CUDA simulator the arrays are NumPy's, whose casts (``ml_dtypes``'
for bfloat16) round float64 once too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numba.cuda import types
from numba.cuda.core import config

from numbabn._cpu import halves as cpu_halves

# The files whose code the kernels' stores compile from (part of the kernel cache's key).
SOURCES = (Path(__file__), Path(cpu_halves.__file__))


def _narrowed_typed(typingctx: Any, value: Any, array: Any) -> Any:
    """``value`` as stored in ``array``: a float64 rounded once to bfloat16 for a bfloat16
    array (its bits), else ``value`` unchanged (the store converts it as it did)."""
    if array.dtype != types.bfloat16:
        return value(value, array), lambda context, builder, signature, args: args[0]
    _, rounded = cpu_halves._bfloat16_of_float64_typed(typingctx, types.float64)
    return types.bfloat16(types.float64, array), rounded


def _narrowed_in_python(value: float, array: Any) -> float:
    """The simulator's :func:`narrowed`: NumPy's assignment rounds."""
    return value


# Half the smallest subnormal of each type the kernels store, by name (numba-cuda's
# types and NumPy's dtypes alike): the largest float64 that rounds to zero as one.
_ZERO_BOUNDS = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150}


def _zero_bound_typed(typingctx: Any, like: Any) -> Any:
    """:func:`zero_bound` of an array or an element: a float64 constant of its type."""
    bound = _ZERO_BOUNDS.get(str(like.dtype if isinstance(like, types.Array) else like), 0.0)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return context.get_constant(types.float64, bound)

    return types.float64(like), codegen


def _zero_bound_in_python(like: Any) -> float:
    """The simulator's :func:`zero_bound`: from the NumPy dtype of the array or element."""
    return _ZERO_BOUNDS.get(np.dtype(getattr(like, "dtype", np.float64)).name, 0.0)


if config.ENABLE_CUDASIM:
    narrowed: Any = _narrowed_in_python
    zero_bound: Any = _zero_bound_in_python
else:
    from numba.cuda.extending import intrinsic

    narrowed = intrinsic(_narrowed_typed)
    # The largest float64 that rounds to zero as an element like ``like`` (an array or
    # an element): the fused ReLU compares with it to see the output's sign and the
    # gradient's mask as PyTorch does, whose ReLU runs on the rounded value (as the CPU
    # kernels' ``zero_bound``).
    zero_bound = intrinsic(_zero_bound_typed)
