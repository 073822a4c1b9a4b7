"""How the CPU kernels are compiled: the Numba decorators, and their on-disk cache key.

Numba checks a cached function against the time stamp of the file that defines
it, and nothing else. But a cached kernel also holds the code of every helper it
inlines and of every kernel it calls, and those live in other files
(:mod:`numbabn._cpu.fused` inlines helpers of :mod:`numbabn._cpu.kernels`, the
drivers of :mod:`numbabn._cpu.parallel` carry a copy of the kernel they call).
After an upgrade that changed only ``kernels.py``, a shared cache would serve
drivers with the old code inside. So every CPU function is stamped instead with
a digest of all of this package's sources: any change anywhere retires the
whole cache, and unchanged sources keep it valid wherever the files are copied.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from numba import njit

__all__ = ["driver", "inline", "kernel", "shared", "source_digest"]

# ``reassoc`` lets LLVM vectorise floating-point reductions. ``nnan``/``ninf``
# are left out on purpose so NaN and inf propagate as in PyTorch.
FASTMATH = {"reassoc", "contract", "nsz"}

SOURCES = Path(__file__).parent


@functools.cache
def source_digest() -> str:
    """SHA-256 of every Python source of the CPU backend, in file-name order."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamped(decorator: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``decorator`` (an ``njit`` with ``cache=True``), then the package-wide cache stamp."""

    def decorate(function: Any) -> Any:
        dispatcher = decorator(function)
        # Numba's index file of this function compares this stamp with the one it
        # was saved under, and discards every entry when they differ.
        dispatcher._cache._cache_file._source_stamp = ("numbabn._cpu", source_digest())
        return dispatcher

    return decorate


# Helpers are inlined into the Numba IR of their caller, never called: a call goes
# through a symbol that binds to whichever compiled copy loaded first (the
# callee's own, or the caller's cached re-optimised one), and the two can round
# differently. ``shared`` helpers are also called from Python.
inline = _stamped(njit(cache=True, inline="always"))
kernel = _stamped(njit(fastmath=FASTMATH, cache=True, nogil=True))
shared = _stamped(njit(fastmath=FASTMATH, cache=True, nogil=True, inline="always"))
# The ``parallel=True`` functions that spread a kernel's items over Numba's threads.
driver = _stamped(njit(parallel=True, cache=True, nogil=True))
