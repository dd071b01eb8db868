"""A write-ahead spool: every unacknowledged record of a client, in one file.

Layout: a 16-byte header (the magic ``IMSPOOL2`` and the little-endian offset
of the first unacknowledged entry), then entries, each a 4-byte little-endian
length, the 8-byte sequence number the record was last sent with (0: never
sent) and that many bytes (a serialized ``StepRecord``).

The telemetry client appends each record with one ``pwrite`` before
``log()`` returns, so a killed process loses nothing (the kernel has the
bytes); the owner calls :meth:`Spool.sync` (``fsync``) once per flush
interval, so a machine crash loses at most that interval. Records stay in
the file until the server acknowledged them: :meth:`Spool.consume` moves the
header's offset past them. The sender records each entry's sequence number
(:meth:`Spool.set_seq`) before sending it, so a replay after a crash skips
what the server already stored. Entries the
owner could not keep in memory are read back with :meth:`Spool.load`. Once
everything is acknowledged the file is truncated, so it only grows while a
backlog exists. A torn last entry (a crash or a full disk in the middle of a
write) is cut off; a file that is not a spool is renamed to
``<name>.corrupt`` and a new one started; a spool of the previous format
(``IMSPOOL1``) is converted.

One process at a time: the file is locked (``flock``) while open, and a
second opener gets :class:`SpoolBusy`. Not thread-safe: the owner serialises
calls (``sync`` may run beside them).

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "run.spool"
>>> spool = Spool(path)
>>> ends = [spool.append(d) for d in (b"one", b"two", b"three")]
>>> [(data, seq) for data, seq, _ in spool.load(2)], spool.unloaded
([(b'one', 0), (b'two', 0)], 1)
>>> spool.set_seq(ends[1], 8, length=3)  # 'two' is sent with sequence 8
>>> spool.consume(ends[0], 1)  # 'one' acknowledged
>>> spool.close()
>>> again = Spool(path)
>>> len(again), [(data, seq) for data, seq, _ in again.load(10)]
(2, [(b'two', 8), (b'three', 0)])
>>> again.consume(again.end, 2); again.close(); path.exists()
False
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

_MAGIC = b"IMSPOOL2"
_MAGIC_V1 = b"IMSPOOL1"
_OFFSET = struct.Struct("<Q")
_HEADER_BYTES = len(_MAGIC) + _OFFSET.size
_LENGTH = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
_PREFIX = struct.Struct("<IQ")  # length, sequence
MAX_ENTRY_BYTES = 64 * 1024 * 1024


class SpoolBusy(OSError):
    """Another client (process) has the spool file open."""


class Spool:
    """A FIFO of byte strings in one append-only file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open_locked(os.O_RDWR | os.O_CREAT)
        self._pending = 0
        self._unloaded = 0
        self._unsynced = False
        try:
            self._consumed, self.end = self._load()
        except OSError:
            os.close(self._fd)
            raise
        self._loaded = self._consumed
        self._unloaded = self._pending

    # ------------------------------------------------------------ opening

    def _open_locked(self, flags: int) -> int:
        fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(
                f"{self.path} is in use by another telemetry client: give each process its "
                "own run_id, rank or spool_dir"
            ) from None
        return fd

    def _load(self) -> tuple[int, int]:
        """Read the header, count the entries, cut off a torn last entry."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return self._start_empty()
        header = os.pread(self._fd, _HEADER_BYTES, 0)
        if header.startswith(_MAGIC_V1):
            return self._convert_v1(size)
        (offset,) = _OFFSET.unpack_from(header.ljust(_HEADER_BYTES, b"\0"), len(_MAGIC))
        if not header.startswith(_MAGIC) or not _HEADER_BYTES <= offset <= size:
            self._move_aside()
            return self._start_empty()
        end, self._pending = self._scan(offset, size, _PREFIX.size)
        if end != size:
            logger.warning("%s: cut off a torn last entry (%d bytes)", self.path, size - end)
            os.ftruncate(self._fd, end)
        return offset, end

    def _scan(self, offset: int, size: int, prefix: int) -> tuple[int, int]:
        end, count = offset, 0
        while end + prefix <= size:
            (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, end))
            if length > MAX_ENTRY_BYTES or end + prefix + length > size:
                break
            end += prefix + length
            count += 1
        return end, count

    def _move_aside(self) -> None:
        corrupt = self.path.with_name(self.path.name + ".corrupt")
        logger.warning("%s is not a telemetry spool: renamed to %s", self.path, corrupt)
        os.close(self._fd)
        os.replace(self.path, corrupt)
        self._fd = self._open_locked(os.O_RDWR | os.O_CREAT)

    def _convert_v1(self, size: int) -> tuple[int, int]:
        (offset,) = _OFFSET.unpack(os.pread(self._fd, _OFFSET.size, len(_MAGIC_V1)))
        if not _HEADER_BYTES <= offset <= size:
            self._move_aside()
            return self._start_empty()
        _, count = self._scan(offset, size, _LENGTH.size)
        entries = []
        position = offset
        for _ in range(count):
            (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, position))
            entries.append(os.pread(self._fd, length, position + _LENGTH.size))
            position += _LENGTH.size + length
        self.rewrite((data, 0) for data in entries)  # the records carry their sequence
        return _HEADER_BYTES, self.end

    def _start_empty(self) -> tuple[int, int]:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, _MAGIC + _OFFSET.pack(_HEADER_BYTES), 0)
        self._pending = 0
        self._unsynced = True
        return _HEADER_BYTES, _HEADER_BYTES

    # ------------------------------------------------------------ the FIFO

    def __len__(self) -> int:
        """Entries in the file (not acknowledged yet)."""
        return self._pending

    @property
    def unloaded(self) -> int:
        """Entries in the file that :meth:`load` has not handed out yet."""
        return self._unloaded

    def append(self, data: bytes, *, loaded: bool = False) -> int:
        """Write one entry at the end now; returns the file offset where it ends.

        ``loaded``: the owner keeps the entry in memory (only allowed while
        nothing is unloaded), so :meth:`load` skips it. An ``OSError`` (disk
        full, I/O error) leaves the file as it was and propagates.
        """
        if loaded and self._unloaded:
            raise ValueError("append(loaded=True) behind unloaded entries would reorder them")
        entry = _PREFIX.pack(len(data), 0) + data
        view = memoryview(entry)
        position = self.end
        try:
            while view:
                written = os.pwrite(self._fd, view, position)
                position += written
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):  # else the next open cuts it off
                os.ftruncate(self._fd, self.end)  # never leave a torn entry behind
            raise
        self.end = position
        self._pending += 1
        self._unsynced = True
        if loaded:
            self._loaded = position
        else:
            self._unloaded += 1
        return position

    def load(self, max_entries: int) -> list[tuple[bytes, int, int]]:
        """Up to ``max_entries`` entries not handed out yet: (data, sequence, end offset)."""
        out: list[tuple[bytes, int, int]] = []
        offset = self._loaded
        while len(out) < max_entries and self._unloaded > len(out):
            length, seq = _PREFIX.unpack(os.pread(self._fd, _PREFIX.size, offset))
            start = offset + _PREFIX.size
            offset = start + length
            out.append((os.pread(self._fd, length, start), seq, offset))
        self._loaded = offset
        self._unloaded -= len(out)
        return out

    def consume(self, end: int, count: int) -> None:
        """The ``count`` oldest entries, up to offset ``end``, are resolved: drop them.

        The file is truncated once nothing is left.
        """
        if count <= 0:
            return
        self._pending -= count
        if self._pending <= 0 and self._unloaded == 0:
            self._consumed, self.end = self._start_empty()
            self._loaded = self._consumed
            return
        self._consumed = end
        os.pwrite(self._fd, _OFFSET.pack(end), len(_MAGIC))
        self._unsynced = True

    def set_seq(self, end: int, seq: int, *, length: int) -> None:
        """Record that the entry of ``length`` bytes ending at ``end`` is sent as ``seq``."""
        os.pwrite(self._fd, _SEQ.pack(seq), end - length - _SEQ.size)
        self._unsynced = True

    def sync(self) -> None:
        """``fsync`` the file (safe beside appends from another thread)."""
        fd = self._fd
        if self._unsynced and fd >= 0:
            self._unsynced = False
            os.fsync(fd)

    def rewrite(self, entries: Iterable[tuple[bytes, int]]) -> None:
        """Make the file hold exactly ``entries`` (data, sequence); fsync it.

        Written to a temporary file and renamed, so a crash leaves either the
        old or the new file. Every entry counts as not loaded.
        """
        tmp = self.path.with_name(self.path.name + ".tmp")
        count = 0
        with open(tmp, "wb") as out:
            out.write(_MAGIC + _OFFSET.pack(_HEADER_BYTES))
            for data, seq in entries:
                out.write(_PREFIX.pack(len(data), seq))
                out.write(data)
                count += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = self._open_locked(os.O_RDWR)
        self.end = os.fstat(self._fd).st_size
        self._consumed = self._loaded = _HEADER_BYTES
        self._pending = self._unloaded = count
        self._unsynced = False

    def close(self) -> None:
        """Sync and close; the file is removed when nothing is left in it."""
        if self._fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1
        if self._pending == 0:
            self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)  # releases the lock; what was appended is in the file

    def forget(self) -> None:
        """Close the descriptor without writing (after fork)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
