"""The store's errors, the same for every backend (a full disk, a busy or broken database).

>>> store_error(OSError(28, "No space left on device")).__class__.__name__
'DiskFull'
"""

from __future__ import annotations

import errno
import sqlite3


class StoreError(RuntimeError):
    """The database refused an operation (disk full, locked, corrupt)."""


class DiskFull(StoreError):
    """The disk holding the database (or its write-ahead log) is full; nothing was written."""


class DatabaseInUse(StoreError):
    """Another server holds the database's lock."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "disk is full" in str(exc)
        )
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def store_error(exc: BaseException, what: str = "database write failed") -> StoreError:
    """The :class:`StoreError` (a :class:`DiskFull` when it is one) for a failed operation."""
    if isinstance(exc, StoreError):
        return exc
    if is_disk_full(exc):
        return DiskFull(f"{what}: the disk is full ({exc})")
    return StoreError(f"{what}: {exc}")


class StreamMoved(Exception):
    """Another server changed a stream this one was about to write (a shared database):
    nothing was written; re-read the stream and try again."""
