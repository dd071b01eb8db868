"""A run's history read with a byte cap: the newest records that fit, parsed off the event loop.

``GetRun`` and ``/api/runs/<run>`` answer at most ``max_history`` records and
at most ``max_history_bytes`` of them (protobuf bytes, counted without token
samples when the caller leaves those out), so one read's memory and time are
bounded whatever the records hold. Rows are streamed from the database newest first
and reading stops at the first record that does not fit; the answer then says it
was truncated, so a client can tell a cut history from a short one.
"""

from __future__ import annotations

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.database import Connection


def read_history_capped(
    conn: Connection,
    run_pk: int,
    limit: int,
    max_bytes: int,
    *,
    samples: bool = True,
    max_read_bytes: int | None = None,
) -> tuple[list[monitor_pb2.StepRecord], bool]:
    """The newest records of run ``run_pk`` (at most ``limit``, ``max_bytes`` in all), oldest
    first, and whether the byte cap left out older ones the limit asked for.

    ``samples=False`` clears each record's token samples before it is counted;
    reading then also stops once ``max_read_bytes`` of stored records were parsed
    (default ``4 * max_bytes``), which bounds the parsing work.
    """
    read_cap = 4 * max_bytes if max_read_bytes is None else max_read_bytes
    kept: list[tuple[int, int, int, monitor_pb2.StepRecord]] = []
    total = raw = 0
    truncated = False
    with conn.stream(
        "SELECT step, rank, sequence, payload FROM records WHERE run_pk = ?"
        " ORDER BY step DESC LIMIT ?",
        (run_pk, limit),
    ) as rows:
        for step, rank, sequence, payload in rows:
            raw += len(payload)
            record = monitor_pb2.StepRecord.FromString(bytes(payload))
            size = len(payload)
            if not samples and record.samples:
                del record.samples[:]
                size = record.ByteSize()
            if total + size > max_bytes or raw > read_cap:
                truncated = True
                break
            total += size
            kept.append((step, rank, sequence, record))
    kept.sort(key=lambda row: row[:3])
    return [row[3] for row in kept], truncated
