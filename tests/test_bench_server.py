"""A tiny run of the store comparison of benchmarks/bench_server.py (``--backends``): SQLite,
PostgreSQL with one replica and with two, real servers and a real PostgreSQL cluster, so the
benchmark's PostgreSQL path cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_server
from inversion_monitor.proto.v1 import monitor_pb2


@pytest.mark.parametrize(
    ("first", "batch", "session"),
    [
        (1, 1, "s"),
        (1, 500, "session-" + "x" * 40),
        (127, 3, "s"),
        (16_380, 10, ""),
        (2**40, 2, "s"),
    ],
)
def test_push_payloads_are_the_requests_the_records_make(
    first: int, batch: int, session: str
) -> None:
    """The load generator's prebuilt bytes parse to the request built record by record (the
    template copied, sequence and step set), field for field, and have its serialized size:
    the server sees the same records on the wire (sequences crossing varint lengths too)."""
    template = bench_server._record(monitor_pb2, "run-a", 8)
    expected = monitor_pb2.PushRequest(writer_session=session)
    for seq in range(first, first + batch):
        rec = expected.records.add()
        rec.CopyFrom(template)
        rec.sequence = rec.step = seq
    payload = bench_server.PushPayloads(monitor_pb2, template, session).push(first, batch)
    parsed = monitor_pb2.PushRequest.FromString(payload)
    assert parsed == expected
    assert [r.sequence for r in parsed.records] == list(range(first, first + batch))
    assert len(payload) == expected.ByteSize() == len(expected.SerializeToString())


@pytest.mark.slow
def test_backends_ingest_and_scrape_on_sqlite_and_one_and_two_postgresql_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every backend ingests records and every replica shows all the runs on /metrics (two
    replicas: each one's runs read back by the other) before its scrape is timed."""
    args = bench_server.parse_args(
        [
            "--backends",
            "sqlite,postgresql,postgresql-2",
            "--backend-runs",
            "30",
            "--duration",
            "1",
            "--clients",
            "2",
            "--batch",
            "20",
            "--scrapes",
            "2",
        ]
    )
    assert args.phases == "backends"
    out = bench_server.phase_backends(args, tmp_path)
    assert list(out) == ["sqlite", "postgresql", "postgresql-2"]
    for backend, (rate, server_cores, database_cores, scrape_ms, client_cores) in out.items():
        assert rate > 0 and server_cores > 0 and scrape_ms > 0 and client_cores > 0, backend
        assert (database_cores > 0) == (backend != "sqlite"), backend
    printed = capsys.readouterr().out
    assert printed.count("scrape (postgresql-2): 32 runs") == 2  # both replicas, every run
    assert "over 2 server(s)" in printed
    assert printed.count("clients used") == 3 and "client cores" in printed
