"""The records a telemetry client holds: memory queue, send window, spool, counts.

:class:`SendWindow` is the one place that knows where each record is and what
became of it. ``log()`` adds records (:meth:`SendWindow.add`); the sender
thread takes numbered batches (:meth:`SendWindow.next_batch`), resolves them
with the server's acknowledgement (:meth:`SendWindow.acknowledge`) and
renumbers after a re-open (:meth:`SendWindow.reopened`). Thread-safe: one lock
(``window.lock``, with the condition ``window.changed``) guards everything.

Numbering: records get their per-(run, rank) sequence when first sent, after
``OpenRun`` told the client the highest sequence the server holds, so dropped
records never leave gaps and a resumed client continues after the server.

With a spool every record is written to it before :meth:`SendWindow.add`
returns and stays there until acknowledged (see :mod:`inversion_monitor.telemetry.spool`);
records beyond ``max_buffer`` live only on disk and are loaded when memory
frees up. A record the disk refused is kept in memory when there is room,
counted in ``DeliveryReport.spool_errors`` either way.

>>> w = SendWindow(max_buffer=10, batch_size=4, spool=None)
>>> from inversion_monitor.proto.v1 import monitor_pb2
>>> [w.add(monitor_pb2.StepRecord(step=s)).outcome for s in range(3)]
['queued', 'queued', 'queued']
>>> w.reopened(acked=41)  # the server holds 41 records of this stream
0
>>> [r.sequence for r in w.next_batch().records]
[42, 43, 44]
>>> w.acknowledge(44, rejected={}).resolved, w.report().delivered
(3, 3)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from google.protobuf.message import DecodeError

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.telemetry.spool import Spool


@dataclass(frozen=True)
class DeliveryReport:
    """What became of the records a client handled.

    ``logged`` records were passed to ``log()``; ``replayed`` were found in the
    spool of an earlier client. Each of them was ``delivered`` (stored by the
    server), ``rejected`` (refused for good by the server), ``spooled`` (left
    on disk for a later client), ``dropped`` (lost: buffer full without a
    spool, or still unsent at close without a spool), or is still pending
    (only while the client is open). ``spool_errors`` counts records the spool
    could not write (disk full, I/O error: kept in memory when there was room,
    else dropped). ``stopped`` names why the client stopped sending (e.g.
    ``"ALREADY_EXISTS"``: another writer holds the stream), empty while it sends.

    >>> r = DeliveryReport(logged=3, replayed=0, delivered=2, rejected=0, spooled=0, dropped=1)
    >>> r.pending, r.complete
    (0, False)
    """

    logged: int
    replayed: int
    delivered: int
    rejected: int
    spooled: int
    dropped: int
    spool_errors: int = 0
    stopped: str = ""

    @property
    def pending(self) -> int:
        """Records neither delivered, rejected, spooled nor dropped yet."""
        return (
            self.logged
            + self.replayed
            - self.delivered
            - self.rejected
            - self.spooled
            - self.dropped
        )

    @property
    def complete(self) -> bool:
        """True when the server answered for every record (stored or rejected)."""
        return self.delivered + self.rejected == self.logged + self.replayed


class Entry:
    """One record: local index, record (or spooled bytes), sequence, place in the spool."""

    __slots__ = ("disk_end", "disk_seq", "idx", "record", "seq", "settled", "size")

    def __init__(
        self,
        idx: int,
        record: monitor_pb2.StepRecord | bytes,
        *,
        disk_end: int = 0,
        size: int = 0,
        disk_seq: int = 0,
    ) -> None:
        self.idx = idx
        self.record = record
        self.seq = 0  # 0: not numbered in the current epoch yet
        self.settled = False  # resolved out of order (unreadable, or already stored)
        self.disk_end = disk_end  # 0: not in the spool
        self.size = size  # bytes of the serialized record in the spool
        self.disk_seq = disk_seq  # the sequence the spool holds for it


Outcome = Literal["queued", "spooled", "overflow", "spool_error", "closed"]


@dataclass(frozen=True)
class Added:
    """What :meth:`SendWindow.add` did: the outcome, a batch is ready, the spool's error."""

    outcome: Outcome
    ready: bool = False
    error: OSError | None = None


@dataclass(frozen=True)
class Batch:
    """Numbered records to push, and how many unreadable spool entries were dropped."""

    records: list[monitor_pb2.StepRecord]
    corrupt: int = 0


@dataclass(frozen=True)
class Acknowledged:
    """What one acknowledgement resolved; ``first_reject`` is one record refused for good."""

    resolved: int
    first_reject: monitor_pb2.RejectedRecord | None = None


class SendWindow:
    """Records held by one client (see the module docstring); thread-safe."""

    def __init__(self, *, max_buffer: int, batch_size: int, spool: Spool | None) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.spool = spool
        self.closed = False
        self._queue: deque[Entry] = deque()
        self._window: deque[Entry] = deque()
        self._acked = 0  # highest contiguous sequence the server holds
        self._next_seq = 1
        self.logged = 0
        self.replayed = len(spool) if spool is not None else 0
        self.delivered = 0
        self.rejected = 0
        self.dropped = 0
        self.spooled = 0
        self.spool_errors = 0
        self.stopped = ""
        self._first_dropped_idx = 0
        # Entries only on disk get local indices in file order.
        self._disk_first_idx = 1
        self._next_idx = self.replayed + 1

    # ------------------------------------------------------------ intake

    def add(self, record: monitor_pb2.StepRecord) -> Added:
        """Hold a new record: in memory, in the spool, or neither (dropped, counted)."""
        data = record.SerializeToString() if self.spool is not None else b""
        with self.lock:
            if self.closed:
                self.dropped += 1
                return Added("closed")
            idx = self._next_idx
            self._next_idx += 1
            self.logged += 1
            room = len(self._queue) + len(self._window) < self.max_buffer
            spool = self.spool
            if spool is None:
                return self._add_to_memory(Entry(idx, record), room)
            keep = room and not spool.unloaded
            try:
                end = spool.append(data, loaded=keep)
            except OSError as exc:
                self.spool_errors += 1
                if keep:
                    self._queue.append(Entry(idx, record))
                else:  # nowhere to put it: behind a disk backlog and memory is full
                    self._drop(idx)
                return Added("spool_error", ready=True, error=exc)
            if keep:
                self._queue.append(Entry(idx, record, disk_end=end, size=len(data)))
                return Added("queued", ready=len(self._queue) >= self.batch_size)
            if spool.unloaded == 1:
                self._disk_first_idx = idx
            return Added("spooled", ready=spool.unloaded >= self.batch_size)

    def _add_to_memory(self, entry: Entry, room: bool) -> Added:
        if room:
            self._queue.append(entry)
            return Added("queued", ready=len(self._queue) >= self.batch_size)
        if self._queue:  # drop the oldest unsent record, keep the new one
            self._drop(self._queue.popleft().idx)
            self._queue.append(entry)
        else:  # everything held is in flight: drop the new record
            self._drop(entry.idx)
        return Added("overflow", ready=True)

    def _drop(self, idx: int) -> None:
        self.dropped += 1
        if not self._first_dropped_idx:
            self._first_dropped_idx = idx

    # ------------------------------------------------------------ sending

    def reopened(self, acked: int) -> int:
        """``OpenRun`` said the server holds ``acked``: skip those, renumber the rest.

        Returns how many held records the server already had.
        """
        with self.lock:
            popped = self._pop_front(lambda e: e.settled or 0 < e.seq <= acked)
            skipped = sum(not e.settled for e in popped)
            self.delivered += skipped
            self._acked = acked
            self._next_seq = acked + 1
            for entry in self._window:
                if not entry.settled:
                    entry.seq = self._next_seq
                    self._next_seq += 1
            self.changed.notify_all()
            return skipped

    def next_batch(self) -> Batch:
        """The send window topped up from memory and the spool, numbered.

        Each record's sequence is written to the spool before it is returned,
        so a replay after a crash knows what the server may already hold.
        """
        with self.lock:
            spool = self.spool
            if spool is not None and spool.unloaded:
                room = self.max_buffer - len(self._queue) - len(self._window)
                if room > 0:
                    for data, seq, end in spool.load(min(room, self.batch_size)):
                        entry = Entry(
                            self._disk_first_idx, data, disk_end=end, size=len(data), disk_seq=seq
                        )
                        self._disk_first_idx += 1
                        self._queue.append(entry)
            while len(self._window) < self.batch_size and self._queue:
                self._window.append(self._queue.popleft())
            entries = list(self._window)
        # Parse, number and record sequences outside the lock; only the sender
        # thread touches the window's entries.
        corrupt = 0
        settled = False
        for entry in entries:
            if entry.seq or entry.settled:
                continue
            record = entry.record
            if isinstance(record, bytes):
                try:
                    record = monitor_pb2.StepRecord.FromString(record)
                except DecodeError:
                    entry.settled = settled = True
                    corrupt += 1
                    with self.lock:
                        self._drop(entry.idx)
                    continue
                entry.record = record
                sent = entry.disk_seq or record.sequence
                if 0 < sent <= self._acked:  # sent by an earlier client; the server has it
                    entry.settled = settled = True
                    with self.lock:
                        self.delivered += 1
                    continue
            entry.seq = self._next_seq
            self._next_seq += 1
        batch = []
        for entry in entries:
            if entry.settled:
                continue
            record = entry.record
            assert isinstance(record, monitor_pb2.StepRecord)
            record.sequence = entry.seq
            batch.append(record)
            if entry.disk_end and entry.disk_seq != entry.seq and spool is not None:
                try:
                    spool.set_seq(entry.disk_end, entry.seq, length=entry.size)
                    entry.disk_seq = entry.seq
                except OSError:
                    pass  # a replay after a crash may resend it; the server keeps both
        if settled:
            with self.lock:
                self._pop_front(lambda e: e.settled)
                self.changed.notify_all()
        return Batch(batch, corrupt=corrupt)

    def acknowledge(
        self, acked: int, rejected: Mapping[int, monitor_pb2.RejectedRecord]
    ) -> Acknowledged:
        """The server holds (or refused) everything up to ``acked``: resolve those."""
        reject: list[monitor_pb2.RejectedRecord] = []
        with self.lock:
            delivered, refused = self.delivered, self.rejected
            for entry in self._pop_front(lambda e: e.settled or e.seq <= acked):
                if entry.settled:
                    continue
                if entry.seq in rejected:
                    self.rejected += 1
                    reject.append(rejected[entry.seq])
                else:
                    self.delivered += 1
            self._acked = max(self._acked, acked)
            resolved = self.delivered - delivered + self.rejected - refused
            self.changed.notify_all()
        return Acknowledged(resolved, reject[0] if reject else None)

    def _pop_front(self, done: Callable[[Entry], bool]) -> list[Entry]:
        """Pop window entries from the front while ``done(entry)``; free their spool space."""
        popped: list[Entry] = []
        last_end, on_disk = 0, 0
        while self._window and done(self._window[0]):
            entry = self._window.popleft()
            popped.append(entry)
            if entry.disk_end:
                last_end, on_disk = entry.disk_end, on_disk + 1
        if on_disk and self.spool is not None:
            try:
                self.spool.consume(last_end, on_disk)
            except OSError:
                self.spool_errors += 1  # replayed later and skipped as already stored
        return popped

    # ------------------------------------------------------------ state

    def min_unresolved(self) -> int:
        """Local index of the oldest record not answered for yet (lock held)."""
        if self._window:
            return self._window[0].idx
        if self._queue:
            return self._queue[0].idx
        if self.spool is not None and self.spool.unloaded:
            return self._disk_first_idx
        return self._next_idx

    @property
    def next_idx(self) -> int:
        """Local index the next record gets (lock held)."""
        return self._next_idx

    def lost_before(self, idx: int) -> bool:
        """True when a record older than local index ``idx`` was dropped (lock held)."""
        return 0 < self._first_dropped_idx < idx

    def report(self) -> DeliveryReport:
        """The counts so far."""
        with self.lock:
            return self._report()

    def _report(self) -> DeliveryReport:
        return DeliveryReport(
            logged=self.logged,
            replayed=self.replayed,
            delivered=self.delivered,
            rejected=self.rejected,
            spooled=self.spooled,
            dropped=self.dropped,
            spool_errors=self.spool_errors,
            stopped=self.stopped,
        )

    def finish(self, *, keep_spool: bool) -> tuple[DeliveryReport, OSError | None]:
        """At close (sender stopped): leave what is unresolved in the spool, or drop it.

        With the spool the records already are on disk; only records the disk
        refused earlier (or settled out of order) make it rewrite the file (in
        order, fsynced).
        """
        error: OSError | None = None
        with self.lock:
            self.closed = True
            held = [e for e in (*self._window, *self._queue) if not e.settled]
            in_order = len(held) == len(self._window) + len(self._queue)
            self._window.clear()
            self._queue.clear()
            spool = self.spool
            if spool is not None and keep_spool:
                try:
                    if not in_order or not all(e.disk_end for e in held):
                        rest = [(data, seq) for data, seq, _ in spool.load(spool.unloaded)]
                        spool.rewrite([(_serialized(e), e.seq) for e in held] + rest)
                    self.spooled = len(spool)
                    spool.close()
                except OSError as exc:
                    error = exc
                    self.spooled = 0
                    self.dropped += len(held) + spool.unloaded
            else:
                self.dropped += len(held) + (spool.unloaded if spool is not None else 0)
            report = self._report()
            self.changed.notify_all()
        return report, error


def _serialized(entry: Entry) -> bytes:
    record = entry.record
    if isinstance(record, bytes):
        return record
    record.sequence = entry.seq
    return record.SerializeToString()
