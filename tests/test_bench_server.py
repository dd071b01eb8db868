"""A tiny run of the store comparison of benchmarks/bench_server.py (``--backends``): SQLite,
PostgreSQL with one replica and with two, real servers and a real PostgreSQL cluster, so the
benchmark's PostgreSQL path cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_server


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
    for backend, (rate, server_cores, database_cores, scrape_ms) in out.items():
        assert rate > 0 and server_cores > 0 and scrape_ms > 0, backend
        assert (database_cores > 0) == (backend != "sqlite"), backend
    printed = capsys.readouterr().out
    assert printed.count("scrape (postgresql-2): 32 runs") == 2  # both replicas, every run
    assert "over 2 server(s)" in printed
