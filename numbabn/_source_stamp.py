"""Key Numba's on-disk cache by the sources a compiled function holds, not only its own file.

Numba checks a cached function against the time stamp of the file that defines
it, and nothing else. A cached kernel also holds the code of every helper it
inlines, and those can live in other files. Stamping every function of a
backend with a digest of all the files its code comes from makes any change in
any of them retire the whole cache, while unchanged sources keep it valid
wherever the files are copied.

Numba also updates a function's index file by reading it, adding an entry and
writing it back, without a lock: processes compiling the same function into one
cache at once (MPI ranks starting on an empty shared cache) could each write
back an index without the other's entry, or give two entries the same data file.
:func:`stamp` makes that update hold a lock file in the cache directory, so
concurrent compilations add their entries one at a time.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from numbabn._file_lock import exclusive

__all__ = ["INDEX_LOCK_NAME", "digest", "stamp"]

# The lock file, in each cache directory, that index updates take turns on.
INDEX_LOCK_NAME = "numbabn-index.lock"


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
    has no cache at all. Each save into the index also takes the cache
    directory's :data:`INDEX_LOCK_NAME` lock (see the module's notes).
    """
    index: Any = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if hasattr(index, "_source_stamp"):
        index._source_stamp = (owner, source_digest)
    if hasattr(index, "save") and hasattr(index, "_cache_path"):
        index.save = functools.partial(_locked_save, index.save, index._cache_path)
    return dispatcher


def _locked_save(save: Any, cache_path: str, key: Any, data: Any) -> None:
    """``save(key, data)`` (which re-reads the index first) under the directory's lock."""
    os.makedirs(cache_path, exist_ok=True)
    with exclusive(os.path.join(cache_path, INDEX_LOCK_NAME)):
        save(key, data)
