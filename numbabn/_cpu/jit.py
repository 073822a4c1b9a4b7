"""How the CPU kernels are compiled: the Numba decorators, and their on-disk cache key.

A cached kernel holds the code of every helper it inlines and of every kernel
it calls, and those live in other files (:mod:`numbabn._cpu.fused` inlines
helpers of :mod:`numbabn._cpu.kernels`, the drivers of :mod:`numbabn._cpu.parallel`
carry a copy of the kernel they call). After an upgrade that changed only
``kernels.py``, a cache checked per file (as Numba's is) would serve drivers
with the old code inside. So every CPU function is cached (by
:func:`numbabn._source_stamp.stamp`) under a digest of all of this package's
sources: any change anywhere retires the whole cache, and unchanged sources
share it wherever the files are installed.

Numba also compiles one variant per combination of argument types: each 4-D
operand C-contiguous, Fortran or strided, read-only or not. Mixed, those made
hundreds of variants per dtype, each compiled for seconds. :func:`launch` calls
the kernels through two variants per dtype instead: every 4-D operand typed
C-contiguous (all of them are) or every one strided (any other mix), inputs
(every 4-D parameter not named in :data:`WRITTEN`) read-only. Numba converts
the actual arrays to those types at the call (a C-contiguous or writable array
is a valid strided or read-only one); the strided variant runs the same
arithmetic with general indexing. The threaded drivers, which only pass their
arrays on, have the strided variant alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic

from numbabn import _source_stamp

__all__ = [
    "DISPATCHERS", "call_native", "driver", "inline", "kernel", "launch", "native_address",
    "shared", "source_digest",
]  # fmt: skip

# ``reassoc`` lets LLVM vectorise floating-point reductions. ``nnan``/``ninf``
# are left out on purpose so NaN and inf propagate as in PyTorch.
FASTMATH = {"reassoc", "contract", "nsz"}

_HERE = Path(__file__).parent
# Every file whose code a compiled CPU function can hold: this package's, and the
# per-channel arithmetic it shares with the CUDA backend.
SOURCES = (*sorted(_HERE.glob("*.py")), _HERE.parent / "_coefficients.py")


@functools.cache
def source_digest() -> str:
    """SHA-256 of every file in :data:`SOURCES`, in order."""
    return _source_stamp.digest(SOURCES)


# The names of the 4-D parameters the kernels and drivers write; every other one is
# an input, typed read-only whether or not the caller's array is writable.
WRITTEN = frozenset({"out", "dx", "dz", "dst"})


# Every CPU dispatcher made so far, for the warm-up's counts of compiled and loaded code.
DISPATCHERS: list[Any] = []


# The drivers: compiled once per dtype, every 4-D operand typed strided (see :func:`launch`).
_STRIDED_ONLY: set[Any] = set()


def _stamped(
    decorator: Callable[[Any], Any], *, by_layout: bool = False, strided_only: bool = False
) -> Callable[[Any], Any]:
    """``decorator`` (an ``njit``), then the package's on-disk cache (:func:`_source_stamp.stamp`).

    With ``by_layout`` the function compiles only through :func:`launch`; with
    ``strided_only`` too, and in its strided variant alone.
    """

    def decorate(function: Any) -> Any:
        dispatcher = _source_stamp.stamp(decorator(function), "numbabn._cpu", source_digest())
        if by_layout or strided_only:
            # What disable_compile() sets; it refuses to before a first signature exists.
            dispatcher._can_compile = False
        if strided_only:
            _STRIDED_ONLY.add(dispatcher)
        DISPATCHERS.append(dispatcher)
        return dispatcher

    return decorate


def launch(dispatcher: Any, *args: Any) -> Any:
    """Call a ``kernel`` or ``driver`` through its variant for these operands' layout family.

    The call itself costs nothing extra: Numba finds the variant (converting the
    arrays) or refuses, and only a refusal leads here to a compilation. A driver
    has its strided variant only: it does no indexing of its own, and an array's
    machine representation is the same whatever its layout type, so that variant
    calls the kernel's contiguous and strided variants alike.
    """
    try:
        return dispatcher(*args)
    except (TypeError, RuntimeError) as error:
        if not _unresolved(error):
            raise
    contiguous = dispatcher not in _STRIDED_ONLY and _all_contiguous(args)
    _compile(dispatcher, args, contiguous)
    if not contiguous and dispatcher not in _STRIDED_ONLY:
        # Else a later all-C-contiguous call would run this variant, by conversion.
        _compile(dispatcher, args, True)
    return dispatcher(*args)


def _unresolved(error: Exception) -> bool:
    """Whether ``error`` is Numba refusing a call for want of a compiled variant."""
    return str(error).startswith(("No matching definition", "compilation disabled"))


def _compile(dispatcher: Any, args: tuple[Any, ...], contiguous: bool) -> None:
    """Compile (or load from the cache) ``dispatcher``'s variant for ``args``.

    Compilation stays disabled outside this function, so that a call converts its
    arrays to a compiled variant rather than compiling one for their exact types.
    It is enabled only under Numba's compiler lock, which Numba's own compilation
    takes before it checks that flag: another thread's call then meets a refusal
    (which :func:`launch` retries), never a compilation of its exact types.
    """
    signature = _variant_signature(dispatcher, args, contiguous)
    with global_compiler_lock:
        dispatcher._can_compile = True
        try:
            dispatcher.compile(signature)
        finally:
            dispatcher._can_compile = False


def _variant_signature(dispatcher: Any, args: tuple[Any, ...], contiguous: bool) -> tuple:
    """The argument types of ``dispatcher``'s variant for ``args`` in one layout family."""
    code = dispatcher.py_func.__code__
    signature = []
    for name, arg in zip(code.co_varnames[: code.co_argcount], args, strict=True):
        arg_type = numba.typeof(arg)
        if isinstance(arg_type, types.Array) and arg_type.ndim == 4:
            readonly = name not in WRITTEN
            arg_type = arg_type.copy(layout="C" if contiguous else "A", readonly=readonly)
        signature.append(arg_type)
    return tuple(signature)


def _all_contiguous(args: tuple[Any, ...]) -> bool:
    return all(
        arg.flags.c_contiguous for arg in args if isinstance(arg, np.ndarray) and arg.ndim == 4
    )


_addresses: dict[tuple, int] = {}


def native_address(dispatcher: Any, args: tuple[Any, ...]) -> int:
    """Address of the native code of ``dispatcher``'s variant for ``args``, once compiled.

    A function called through it (see :func:`call_native`) runs that very code:
    the caller neither links a copy of it nor optimises it again.
    """
    contiguous = _all_contiguous(args)
    key = (dispatcher, contiguous) + tuple(
        (arg.dtype.num, arg.ndim, arg.flags.c_contiguous, arg.flags.writeable)
        if isinstance(arg, np.ndarray)
        else type(arg)
        for arg in args
    )
    address = _addresses.get(key)
    if address is None:
        result = dispatcher.overloads[_variant_signature(dispatcher, args, contiguous)]
        address = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
        _addresses[key] = address
    return address


def _call_native(typingctx: Any, address: Any, args: Any) -> Any:
    """Call the native code at ``address`` (an integer) with the tuple ``args``.

    The callee must be a Numba function of ``args``' types returning nothing
    (:func:`native_address` gives one); its arrays may differ in layout type
    only, which leaves their structure in memory the same. Numba's own calling
    convention, through a pointer, so the caller's compilation never sees the callee's body.
    """
    if not isinstance(address, types.Integer) or not isinstance(args, types.BaseTuple):
        return None

    def codegen(context: Any, builder: Any, signature: Any, llargs: Any) -> Any:
        arg_types = list(signature.args[1].types)
        function_type = context.call_conv.get_function_type(types.none, arg_types)
        callee = builder.inttoptr(llargs[0], function_type.as_pointer())
        values = cgutils.unpack_tuple(builder, llargs[1], len(arg_types))
        context.call_conv.call_function(builder, callee, types.none, arg_types, values)
        return context.get_dummy_value()

    return types.none(address, args), codegen


call_native: Any = intrinsic(_call_native)


# Helpers are inlined into the Numba IR of their caller, never called: a call goes
# through a symbol that binds to whichever compiled copy loaded first (the
# callee's own, or the caller's cached re-optimised one), and the two can round
# differently. ``shared`` helpers (of per-channel vectors) are also called from Python.
#
# Every function divides as IEEE floats do (``error_model="numpy"``): ``1 / 0`` is
# inf (a zero running variance with ``eps=0`` in evaluation) where
# Numba's default would raise ZeroDivisionError.
inline = _stamped(njit(error_model="numpy", inline="always"))
shared = _stamped(njit(fastmath=FASTMATH, error_model="numpy", nogil=True, inline="always"))
# Functions of 4-D operands, called from Python through :func:`launch`.
kernel = _stamped(njit(fastmath=FASTMATH, error_model="numpy", nogil=True), by_layout=True)
# The ``parallel=True`` functions that spread a kernel's items over Numba's threads.
driver = _stamped(njit(parallel=True, error_model="numpy", nogil=True), strided_only=True)
