"""An append-only spool file of length-prefixed records (a FIFO on disk).

Layout: a 16-byte header (the magic ``IMSPOOL1`` and the little-endian
offset of the first unread entry), then entries, each a 4-byte little-endian
length followed by that many bytes (a serialized ``StepRecord``). Appends go
to a small in-memory buffer that is written with ``os.write`` when it passes
64 KiB and on :meth:`Spool.sync`; ``sync`` also calls ``os.fsync``. The owner
(the telemetry client) syncs once per flush interval and on close, so a
machine crash loses at most the last interval of spilled records. Reading
entries moves the header's offset past them: the file holds exactly the
entries not handed to the reader yet, so a replay after a crash never sends
a record twice. Once everything is read the file is truncated, so it only
grows while a backlog exists. A torn last entry (a crash in the middle of a
write) is cut off when the file is opened again; a file that is not a spool
is renamed to ``<name>.corrupt`` and a new one started.

Not thread-safe: the owner serialises calls.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "run.spool"
>>> spool = Spool(path)
>>> spool.append(b"one"); spool.append(b"two"); spool.append(b"three")
>>> len(spool), spool.read(1), len(spool)
(3, [b'one'], 2)
>>> spool.close()
>>> again = Spool(path)
>>> len(again), again.read(10)
(2, [b'two', b'three'])
>>> again.close(); path.exists()
False
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

_MAGIC = b"IMSPOOL1"
_OFFSET = struct.Struct("<Q")
_HEADER_BYTES = len(_MAGIC) + _OFFSET.size
_LENGTH = struct.Struct("<I")
_BUFFER_BYTES = 64 * 1024
MAX_ENTRY_BYTES = 64 * 1024 * 1024


class Spool:
    """A FIFO of byte strings in one append-only file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._buffer = bytearray()
        self._pending = 0
        self._unsynced = False
        self._read_offset, self._end = self._load()

    def _load(self) -> tuple[int, int]:
        """Read the header, count the unread entries, cut off a torn last entry."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return self._start_empty()
        header = os.pread(self._fd, _HEADER_BYTES, 0)
        (offset,) = _OFFSET.unpack_from(header.ljust(_HEADER_BYTES, b"\0"), len(_MAGIC))
        if not header.startswith(_MAGIC) or not _HEADER_BYTES <= offset <= size:
            corrupt = self.path.with_name(self.path.name + ".corrupt")
            logger.warning("%s is not a telemetry spool: renamed to %s", self.path, corrupt)
            os.close(self._fd)
            os.replace(self.path, corrupt)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            return self._start_empty()
        end = offset
        while end + _LENGTH.size <= size:
            (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, end))
            if length > MAX_ENTRY_BYTES or end + _LENGTH.size + length > size:
                break
            end += _LENGTH.size + length
            self._pending += 1
        if end != size:
            logger.warning("%s: cut off a torn last entry (%d bytes)", self.path, size - end)
            os.ftruncate(self._fd, end)
        return offset, end

    def _start_empty(self) -> tuple[int, int]:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, _MAGIC + _OFFSET.pack(_HEADER_BYTES), 0)
        self._unsynced = True
        return _HEADER_BYTES, _HEADER_BYTES

    def __len__(self) -> int:
        """Entries appended (or found on disk) and not read yet."""
        return self._pending

    def append(self, data: bytes) -> None:
        """Add one entry at the end."""
        self._buffer += _LENGTH.pack(len(data))
        self._buffer += data
        self._pending += 1
        if len(self._buffer) >= _BUFFER_BYTES:
            self._write_buffer()

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        data = memoryview(bytes(self._buffer))
        self._buffer.clear()
        while data:
            written = os.pwrite(self._fd, data, self._end)
            self._end += written
            data = data[written:]
        self._unsynced = True

    def read(self, max_entries: int) -> list[bytes]:
        """Remove and return up to ``max_entries`` entries from the front."""
        self._write_buffer()
        out: list[bytes] = []
        offset = self._read_offset
        while len(out) < max_entries and offset < self._end:
            (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, offset))
            start = offset + _LENGTH.size
            out.append(os.pread(self._fd, length, start))
            offset = start + length
        if not out:
            return out
        self._pending -= len(out)
        if self._pending == 0:
            self._read_offset, self._end = self._start_empty()
        else:
            self._read_offset = offset
            os.pwrite(self._fd, _OFFSET.pack(offset), len(_MAGIC))
            self._unsynced = True
        return out

    def sync(self) -> None:
        """Write the buffer and fsync the file."""
        self._write_buffer()
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False

    def replace_all(self, head: Iterable[bytes]) -> None:
        """Make the file hold ``head`` followed by the unread entries; fsync it.

        Used on close to put the records still in memory (older than anything
        on disk) in front of the backlog. Written to a temporary file and
        renamed, so a crash leaves either the old or the new file.
        """
        rest = self.read(self._pending)
        tmp = self.path.with_name(self.path.name + ".tmp")
        count = 0
        with open(tmp, "wb") as out:
            out.write(_MAGIC + _OFFSET.pack(_HEADER_BYTES))
            for data in (*head, *rest):
                out.write(_LENGTH.pack(len(data)))
                out.write(data)
                count += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self._end = os.fstat(self._fd).st_size
        self._read_offset = _HEADER_BYTES
        self._pending = count
        self._unsynced = False

    def close(self) -> None:
        """Sync and close; the file is removed when nothing is left in it."""
        if self._fd < 0:
            return
        self.sync()
        os.close(self._fd)
        self._fd = -1
        if self._pending == 0:
            self.path.unlink(missing_ok=True)

    def forget(self) -> None:
        """Drop the buffer and close the descriptor without writing (after fork)."""
        self._buffer.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
