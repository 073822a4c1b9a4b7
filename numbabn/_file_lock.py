"""An exclusive lock on a file, shared by every process that opens the same path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["exclusive"]


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file at ``path`` (created if missing).

    A POSIX record lock, which also works on network file systems that share a
    cache between nodes. Without ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
