"""Key Numba's on-disk cache by the sources a compiled function holds, not only its own file.

Numba checks a cached function against the time stamp of the file that defines
it, and nothing else. A cached kernel also holds the code of every helper it
inlines, and those can live in other files. Stamping every function of a
backend with a digest of all the files its code comes from makes any change in
any of them retire the whole cache, while unchanged sources keep it valid
wherever the files are copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["digest", "stamp"]


def digest(paths: Iterable[Path]) -> str:
    """SHA-256 of the files' names and contents, in the order given."""
    result = hashlib.sha256()
    for path in paths:
        result.update(path.name.encode())
        result.update(path.read_bytes())
    return result.hexdigest()


def stamp(dispatcher: Any, owner: str, source_digest: str) -> Any:
    """Make ``dispatcher``'s cache index (if it has one) valid only for ``source_digest``.

    Numba's index file compares this stamp with the one it was saved under, and
    discards every entry when they differ. A Numba whose cache lacks the
    attribute keeps its per-file stamp (the tests say so); the CUDA simulator
    has no cache at all.
    """
    index: Any = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if hasattr(index, "_source_stamp"):
        index._source_stamp = (owner, source_digest)
    return dispatcher
