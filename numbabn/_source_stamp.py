"""The kernels' on-disk cache: keyed by their sources, shared by every install, never fatal.

Numba checks a cached function against the file that defines it, and nothing
else; it names the cache's folder after that file's path, and it raises at
decoration time when it finds no writable place. :func:`stamp` gives a
dispatcher a cache of its own instead:

- **Keyed by the sources.** A cached kernel also holds the code of every helper
  it inlines, and those can live in other files. Every function of a backend
  carries a digest of all the files its code comes from, so any change in any
  of them retires the whole cache.
- **One cache for every install.** The folder is named after that digest, not
  after a path: two installs of the same sources (two virtual environments, a
  container layer, a cluster node that mounts the package elsewhere) share one
  set of compiled kernels in one ``NUMBA_CACHE_DIR``; different sources never
  share an entry.
- **Never beside the sources.** The folder lies in ``NUMBA_CACHE_DIR`` when it
  is set, else in the user's cache directory (``~/.cache/numbabn`` on Linux), so
  uninstalling leaves nothing in site-packages.
- **It can never break a run.** Nothing is read or written at import. An entry
  that cannot be read (a missing, truncated or overwritten file, a data file
  whose checksum in the index does not match) is compiled afresh and saved
  over. Where nothing can be saved (no writable place, a full disk) the kernels
  are compiled in memory, with one :class:`KernelCacheWarning` per process.
- **Safe for concurrent and interrupted saves.** Numba updates an index by
  reading it, adding an entry and writing it back, without a lock: processes
  compiling into one cache at once (MPI ranks on an empty shared cache) could
  each write back an index without the other's entry. A save here holds a lock
  file in the cache folder, writes the data file first and the index entry
  naming it (with the data's SHA-256) last, each by an atomic rename: a process
  killed at any point leaves no entry pointing at missing or partial data.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numbabn._file_lock import exclusive

__all__ = [
    "INDEX_LOCK_NAME", "KernelCacheWarning", "cache_root", "digest", "save_failed", "stamp",
]  # fmt: skip

# The lock file, in each cache folder, that index updates take turns on.
INDEX_LOCK_NAME = "numbabn-index.lock"


class KernelCacheWarning(RuntimeWarning):
    """Compiled kernels cannot be saved: they are compiled in memory for this process."""


def digest(paths: Iterable[Path]) -> str:
    """SHA-256 of the files' names and contents, in the order given."""
    result = hashlib.sha256()
    for path in paths:
        result.update(path.name.encode())
        result.update(path.read_bytes())
    return result.hexdigest()


def cache_root() -> str:
    """Where the kernel caches lie: ``NUMBA_CACHE_DIR`` if set, else the user's cache directory."""
    from numba import config
    from numba.misc.appdirs import AppDirs

    configured = getattr(config, "CACHE_DIR", "")  # NUMBA_CACHE_DIR, read at Numba's import
    if configured:
        return str(configured)
    return str(AppDirs("numbabn", appauthor=False).user_cache_dir)


def stamp(dispatcher: Any, owner: str, source_digest: str) -> Any:
    """Give ``dispatcher`` the on-disk cache of ``owner``'s sources (see the module's notes).

    ``owner`` names the backend (``"numbabn._cpu"``) and ``source_digest`` is
    :func:`digest` of every file its compiled code comes from. A dispatcher
    without caching (the CUDA simulator's) is returned unchanged.
    """
    if not hasattr(dispatcher, "enable_caching"):
        return dispatcher
    cache_class = _cache_class(_numba_cache_class(dispatcher), _Folder(owner, source_digest))
    dispatcher._cache = cache_class(dispatcher.py_func)
    return dispatcher


def _numba_cache_class(dispatcher: Any) -> type:
    """The class of cache Numba itself gives ``dispatcher`` (CPU or CUDA)."""
    from numba.core.registry import CPUDispatcher

    if isinstance(dispatcher, CPUDispatcher):
        from numba.core.caching import FunctionCache

        return FunctionCache
    from numba.cuda.dispatcher import CUDACache

    return CUDACache


@dataclass(frozen=True)
class _Folder:
    """The cache folder of one backend's sources; Numba's cache asks it for a locator."""

    owner: str
    source_digest: str

    @property
    def path(self) -> str:
        return os.path.join(cache_root(), f"{self.owner}-{self.source_digest[:20]}")

    def from_function(self, py_func: Any, py_file: str) -> _Locator:
        return _Locator(self, py_func, py_file)


class _Locator:
    """Numba's cache locator interface, over a :class:`_Folder` (no I/O until a save)."""

    def __init__(self, folder: _Folder, py_func: Any, py_file: str) -> None:
        self._folder = folder
        self._py_file = py_file  # Numba's warnings about uncachable functions name it
        self._lineno = py_func.__code__.co_firstlineno
        self._path = folder.path

    def get_cache_path(self) -> str:
        return self._path

    def get_source_stamp(self) -> tuple[str, str]:
        return (self._folder.owner, self._folder.source_digest)

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    def ensure_cache_path(self) -> None:
        os.makedirs(self._path, exist_ok=True)


@functools.cache
def _cache_class(numba_cache: type, folder: _Folder) -> type:
    """``numba_cache`` located in ``folder``, with :class:`_SafeEntries`' loads and saves."""
    impl = type(
        numba_cache._impl_class.__name__,  # type: ignore[attr-defined]
        (numba_cache._impl_class,),  # type: ignore[attr-defined]
        {"_locator_classes": [folder]},
    )
    return type(numba_cache.__name__, (_SafeEntries, numba_cache), {"_impl_class": impl})


# Whether saving has failed in this process: it is then not tried again, and warned of once.
_save_failed = False


def save_failed() -> bool:
    """Whether a compiled kernel could not be saved in this process (and was warned of)."""
    return _save_failed


class _SafeEntries:
    """Loads and saves of a Numba cache that never raise (a mixin of Numba's cache class)."""

    _cache_file: Any
    _impl: Any

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        # Any failure, whatever the damage: the caller then compiles, and saves over it.
        try:
            return super().load_overload(sig, target_context)  # type: ignore[misc]
        except Exception:
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        global _save_failed
        if _save_failed:
            return
        try:
            super().save_overload(sig, data)  # type: ignore[misc]
        except Exception as error:
            _save_failed = True
            path = self._cache_file._cache_path
            warnings.warn(_cannot_save_message(path, error), KernelCacheWarning, stacklevel=1)

    def _load_overload(self, sig: Any, target_context: Any) -> Any:
        key = self._index_key(sig, target_context.codegen())  # type: ignore[attr-defined]
        data = _load_entry(self._cache_file, key)
        return None if data is None else self._impl.rebuild(target_context, data)

    def _save_overload(self, sig: Any, data: Any) -> None:
        if not self._impl.check_cachable(data):
            return
        key = self._index_key(sig, data.codegen)  # type: ignore[attr-defined]
        _save_entry(self._cache_file, key, self._impl.reduce(data))


def _cannot_save_message(path: str, error: Exception) -> str:
    return (
        f"numbabn cannot save compiled kernels in {path} ({type(error).__name__}: {error}); "
        "they are compiled in memory and kept for this process only. Set NUMBA_CACHE_DIR "
        "to a writable directory to keep them across runs."
    )


def _entries(files: Any) -> dict[Any, tuple[str, str]]:
    """The index's entries (key -> data file name and SHA-256), empty if it cannot be read.

    ``files`` is Numba's ``IndexDataCacheFile`` of the function: its index holds
    the entries under the version of Numba and the source stamp, and reads as
    empty when either differs.
    """
    try:
        entries = files._load_index()
    except Exception:  # truncated, overwritten, unreadable: as if there were none
        return {}
    if not isinstance(entries, dict):
        return {}
    return {
        key: entry for key, entry in entries.items() if isinstance(entry, tuple) and len(entry) == 2
    }


def _load_entry(files: Any, key: Any) -> Any:
    """The data saved under ``key``, or None if missing or not what was saved."""
    entry = _entries(files).get(key)
    if entry is None:
        return None
    name, checksum = entry
    try:
        with open(files._data_path(name), "rb") as handle:
            payload = handle.read()
    except OSError:
        return None
    if hashlib.sha256(payload).hexdigest() != checksum:
        return None
    return pickle.loads(payload)


def _save_entry(files: Any, key: Any, data: Any) -> None:
    """Save ``data`` under ``key``: the data file, then the index entry that names it."""
    payload = files._dump(data)
    os.makedirs(files._cache_path, exist_ok=True)
    with exclusive(os.path.join(files._cache_path, INDEX_LOCK_NAME)):
        entries = _entries(files)
        name = entries[key][0] if key in entries else _free_data_name(files, entries)
        with files._open_for_write(files._data_path(name)) as handle:
            handle.write(payload)
        entries[key] = (name, hashlib.sha256(payload).hexdigest())
        files._save_index(entries)


def _free_data_name(files: Any, entries: dict[Any, tuple[str, str]]) -> str:
    taken = {name for name, _ in entries.values()}
    number = 1
    while files._data_name(number) in taken:
        number += 1
    return str(files._data_name(number))
