"""End to end: MonitorClient against the real server as a subprocess.

``inversion-monitor serve`` runs in its own process on a SQLite file; the
tests kill it with SIGKILL mid-stream, restart it on the same database and
port, or start it only after the client has been logging for a while, and
check in the database (and through GetRun) that every record is stored
exactly once, in order, without gaps.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from tests.scripted_server import FAST, stats
from tests.server_support import free_port, wait_until

START_TIMEOUT_S = 30.0


class ServeProcess:
    """``inversion-monitor serve`` in a subprocess, on a given database (a SQLite path or a
    ``postgresql://`` URL) and port."""

    def __init__(self, db: Path | str, port: int = 0) -> None:
        self.db = db
        self.port = port
        self.process: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        command = [
            sys.executable,
            "-m",
            "inversion_monitor.app.cli",
            "serve",
            "--db",
            str(self.db),
            "--grpc-address",
            f"127.0.0.1:{self.port}",
            "--http-address",
            "off",
            "--log-level",
            "WARNING",
        ]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the port of a killed server may take a moment to free up
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            address = _read_address(process, deadline)
            if address is not None:
                break
            process.kill()
            process.wait(10)
            assert time.monotonic() < deadline, "inversion-monitor serve did not start"
            time.sleep(0.2)
        self.port = int(address.rsplit(":", 1)[1])
        self.process = process
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None


def _read_address(process: subprocess.Popen[str], deadline: float) -> str | None:
    """The address of the 'grpc listening on HOST:PORT' line, or None if it exited."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line is None:
            return None
        if line.startswith("grpc listening on "):
            return line.split()[-1]
    return None


def _stored(db: Path, run_id: str, rank: int = 0) -> list[tuple[int, int]]:
    """(sequence, step) of every stored record of the run's rank, by sequence."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT r.sequence, r.step FROM records r JOIN runs ON runs.pk = r.run_pk "
            "WHERE runs.run_id = ? AND r.rank = ? ORDER BY r.sequence",
            (run_id, rank),
        ).fetchall()
    return [(int(sequence), int(step)) for sequence, step in rows]


def _get_run(endpoint: str, run_id: str, history: int) -> monitor_pb2.GetRunResponse:
    with grpc.insecure_channel(endpoint) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        response: monitor_pb2.GetRunResponse = stub.GetRun(
            monitor_pb2.GetRunRequest(run=run_id, history_limit=history), timeout=10
        )
        return response


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "monitor.db"


def test_sigkill_mid_stream_and_restart_store_every_record_once(db: Path) -> None:
    server = ServeProcess(db).start()
    total = 5000
    try:
        client = MonitorClient(
            server.endpoint, "e2e kill", run_id="e2e-kill", batch_size=100, **FAST
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            for step in range(total):
                client.log(step, stats(step), loss=1.0 / (step + 1))
                if step % 50 == 49:
                    time.sleep(0.005)  # a stream, not one burst
                if step == 2000:
                    before = client.report().delivered
                    server.kill()  # SIGKILL while records are in flight
                if step == 3000:
                    server.start()  # same database, same port
            assert client.flush(timeout_s=60)
        report = client.close(timeout_s=10)
        assert before > 0  # the kill came after deliveries had started
        assert (report.logged, report.delivered, report.dropped) == (total, total, 0)
        assert _stored(db, "e2e-kill") == [(seq, seq - 1) for seq in range(1, total + 1)]
        response = _get_run(server.endpoint, "e2e-kill", history=total)
        assert response.summary.records == total
        assert [r.step for r in response.history] == list(range(total))
        assert response.summary.status == "completed"
    finally:
        server.stop()


@pytest.mark.parametrize("small_buffer_with_spool", [False, True])
def test_server_appearing_later_receives_everything(
    db: Path, tmp_path: Path, small_buffer_with_spool: bool
) -> None:
    server = ServeProcess(db, port=free_port())
    options = (
        {"max_buffer": 100, "batch_size": 20, "spool_dir": tmp_path / "spool"}
        if small_buffer_with_spool
        else {}
    )
    client = MonitorClient(server.endpoint, "e2e late", run_id="e2e-late", **FAST, **options)  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            for step in range(1000):
                client.log(step, stats(step))
            assert not client.flush(timeout_s=0.5)
            # the client's own record of its warning (the process-wide warning registry
            # may have shown an equal one for an earlier test already)
            wait_until(
                "the unreachable warning",
                lambda: any("cannot deliver telemetry" in m for m in client.warnings),
            )
        if small_buffer_with_spool:
            assert (tmp_path / "spool" / "e2e-late.rank0.spool").exists()
        server.start()
        for step in range(1000, 1200):
            client.log(step, stats(step))
        assert client.flush(timeout_s=60)
        report = client.close(timeout_s=10)
        assert (report.logged, report.delivered, report.dropped) == (1200, 1200, 0)
        assert _stored(db, "e2e-late") == [(seq, seq - 1) for seq in range(1, 1201)]
        assert _get_run(server.endpoint, "e2e-late", history=10).summary.records == 1200
    finally:
        client.close(timeout_s=0)
        server.stop()
