"""The database on a real server: unknown fields, exclusive lock, integrity, lost WAL, full disk.

The full-disk test mounts a 1 MiB tmpfs, which needs root (``mount``); this
machine's tests run as root.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from inversion_monitor.app.cli import main
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server import MonitorServer
from inversion_monitor.server.database import POSTGRESQL, SQLITE
from inversion_monitor.server.schema import SCHEMA_VERSION, StoreError
from tests.postgres_support import TestDatabase
from tests.server_support import (
    TIMEOUT,
    config,
    open_run,
    push,
    push_request,
    record,
    running,
    stub_for,
    wait_until,
)

MARKER = b"UNKNOWN-FIELD-PADDING-"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _unknown_field(size: int, number: int = 1000) -> bytes:
    """A length-delimited field with a number the schema does not have."""
    blob = (MARKER * (size // len(MARKER) + 1))[:size]
    return _varint(number << 3 | 2) + _varint(len(blob)) + blob


def _embedded(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_unknown_fields_are_neither_stored_nor_kept(tmp_path: Path) -> None:
    with running(tmp_path) as server, grpc.insecure_channel(server.grpc_target) as channel:
        open_call = channel.unary_unary(
            "/inversion_monitor.v1.MonitorService/OpenRun",
            response_deserializer=monitor_pb2.OpenRunResponse.FromString,
        )
        push_call = channel.unary_unary(
            "/inversion_monitor.v1.MonitorService/Push",
            response_deserializer=monitor_pb2.PushResponse.FromString,
        )
        sessions = []
        for i in range(5):  # 5 x 1 MB of padding, nested and at the top level
            info = monitor_pb2.RunInfo(run_id=f"pad{i}", name=f"pad{i}", world_size=1)
            raw = _embedded(1, info.SerializeToString() + _unknown_field(500_000))
            opened = open_call(raw + _unknown_field(500_000), timeout=TIMEOUT)
            sessions.append(opened.writer_session)
        rec = record("pad0", 1).SerializeToString() + _unknown_field(300_000)
        raw = _embedded(1, rec) + _embedded(2, sessions[0].encode()) + _unknown_field(300_000)
        assert push_call(raw, timeout=TIMEOUT).accepted == 1

        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
        assert listed.ByteSize() < 10_000
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="pad0"), timeout=TIMEOUT)
        assert got.ByteSize() < 10_000 and got.history[0].sequence == 1
        views = server.ingestor.views
        assert all(view.info.ByteSize() < 200 for view in views.values())
        assert views["pad0"].latest is not None and views["pad0"].latest.ByteSize() < 1000
    with sqlite3.connect(tmp_path / "monitor.db") as conn:
        blobs = [row[0] for row in conn.execute("SELECT info FROM runs")]
        blobs += [row[0] for row in conn.execute("SELECT payload FROM records")]
    assert blobs and not any(MARKER in blob for blob in blobs)
    assert (tmp_path / "monitor.db").stat().st_size < 200_000


def test_a_second_server_on_the_same_database_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        with pytest.raises(StoreError, match="in use by another inversion-monitor server"):
            MonitorServer(config(tmp_path)).start()
        db = str(tmp_path / "monitor.db")
        args = ["serve", "--db", db, "--grpc-address", "127.0.0.1:0", "--http-address", "off"]
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "stop that server, or give this one another --db" in err
        assert push(stub, record("run1", 1)).accepted == 1  # the first one is unaffected
    with running(tmp_path):  # free again once the first one stopped
        pass


def test_a_damaged_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        for i in range(20):
            open_run(stub, f"run{i}", config_json='{"pad": "' + "x" * 2000 + '"}')
            push(stub, *(record(f"run{i}", s) for s in range(1, 30)))
    db = tmp_path / "monitor.db"
    size = db.stat().st_size
    assert size > 100_000
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreError) as err:
        MonitorServer(config(tmp_path)).start()
    message = str(err.value)
    assert "is damaged" in message and "restore it from a backup" in message
    assert "\n" not in message


@contextmanager
def _serve_process(db: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "inversion_monitor.app.cli", "serve", "--db", str(db)),
            *("--grpc-address", "127.0.0.1:0", "--http-address", "off", "--log-level", "WARNING"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("grpc listening on"), line
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_lost_write_ahead_log_after_an_unclean_stop_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "monitor.db"
    with _serve_process(db) as (proc, target), grpc.insecure_channel(target) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        open_run(stub, "run1")
        assert push(stub, *(record("run1", s) for s in range(1, 6))).acks[0].acked_sequence == 5
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    wal = tmp_path / "monitor.db-wal"
    assert wal.exists()  # the acknowledged records live there until a checkpoint
    # the WAL intact: the next start recovers every acknowledged record
    with running(tmp_path) as server, stub_for(server) as stub:
        assert open_run(stub, "run1").acked_sequence == 5
        push(stub, record("run1", 6))
    with _serve_process(db) as (proc, target), grpc.insecure_channel(target) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        assert open_run(stub, "run1").acked_sequence == 6
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / "monitor.db.lock").read_text().strip() == "running"
    wal.unlink()
    with pytest.raises(StoreError) as err:
        MonitorServer(config(tmp_path)).start()
    message = str(err.value)
    assert "was not closed cleanly" in message and "monitor.db-wal is missing" in message
    assert "put the -wal file back" in message and "delete" in message
    (tmp_path / "monitor.db.lock").unlink()  # the documented way to accept the loss
    with running(tmp_path):
        pass


def _retry_delay(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status details"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


def _health(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=TIMEOUT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (needs root)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(path: Path) -> Path:
    """Fill the file system at ``path`` to its last byte. Unbuffered: a buffered writer keeps
    the tail of a partial write and raises ENOSPC again when it is closed."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = os.urandom(16384)
        try:
            while f.write(chunk):
                pass
        except OSError:
            pass
    return filler


def _big_records(start: int, count: int) -> list[monitor_pb2.StepRecord]:
    out = []
    for seq in range(start, start + count):
        rec = record("run1", seq)
        for j in range(200):
            rec.samples.add(entropy=1.0 + j, score=0.5, token_id=j)
        out.append(rec)
    return out


def test_a_full_disk_answers_resource_exhausted_and_recovers_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inversion_monitor.server")
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        with running(disk, alerts=False) as server, stub_for(server) as stub:
            assert server.http_url is not None
            open_run(stub, "run1", world_size=1)
            filler = _fill(disk)
            seq, refusals, err = 1, 0, None
            for _ in range(200):  # until the database needs a page it cannot get
                try:
                    resp = stub.Push(push_request(stub, *_big_records(seq, 20)), timeout=TIMEOUT)
                    seq = resp.acks[0].acked_sequence + 1
                except grpc.RpcError as exc:
                    err = exc
                    refusals += 1
                    if refusals == 3:
                        break
            assert err is not None, "the disk never filled up"
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "disk is full" in err.details() and "retry" in err.details()
            assert _retry_delay(err) == 5.0
            status, body = _health(server.http_url)
            assert status == 503 and body.startswith("degraded:") and "disk is full" in body
            full_lines = [r for r in caplog.records if "database disk full" in r.getMessage()]
            assert len(full_lines) == 1  # one line per state change, not per request
            assert not any(r.exc_info for r in caplog.records)
            assert "Traceback" not in caplog.text

            filler.unlink()  # space returns: the server recovers by itself
            wait_until("healthz to recover", lambda: _health(server.http_url)[0] == 200, TIMEOUT)
            assert _health(server.http_url) == (200, "ok\n")
            resp = stub.Push(push_request(stub, *_big_records(seq, 5)), timeout=TIMEOUT)
            assert resp.accepted == 5
            acked = resp.acks[0].acked_sequence
            assert acked == seq + 4
            back = [r for r in caplog.records if "writable again" in r.getMessage()]
            assert len(back) == 1
        with sqlite3.connect(disk / "monitor.db") as conn:
            stored = [s for (s,) in conn.execute("SELECT sequence FROM records ORDER BY sequence")]
        assert stored == list(range(1, acked + 1))  # every acknowledged record, no gap


# schema version 1 in either dialect (Dialect.ddl fills in the types)
SCHEMA_1 = """
CREATE TABLE runs (pk {serial_key}, run_id TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL UNIQUE, project TEXT NOT NULL, info {blob} NOT NULL,
    world_size {integer} NOT NULL, opened_time {real} NOT NULL, last_update_time {real},
    last_activity_time {real} NOT NULL, status TEXT NOT NULL,
    records {integer} NOT NULL DEFAULT 0);
CREATE TABLE ranks (run_pk {integer} NOT NULL REFERENCES runs(pk), rank {integer} NOT NULL,
    acked_sequence {integer} NOT NULL, status TEXT NOT NULL, PRIMARY KEY (run_pk, rank))
    {without_rowid};
"""


def test_a_schema_1_database_gains_sessions_and_keeps_its_runs(
    tmp_path: Path, database: TestDatabase
) -> None:
    info = monitor_pb2.RunInfo(run_id="old", name="old", project="p", world_size=1)
    dialect = POSTGRESQL if database.postgres else SQLITE
    statements = [*dialect.ddl(SCHEMA_1).split(";")[:-1]]
    statements += [
        *dialect.migration_lock[1:],  # PostgreSQL: the version table
        *(s.format(version=1) for s in dialect.write_version),
        "INSERT INTO runs (run_id, display_name, project, info, world_size, opened_time,"
        " last_activity_time, status) VALUES ('old', 'old', 'p', ?, 1, 1.0, 1.0, 'running')",
        "INSERT INTO ranks VALUES (1, 0, 3, 'running')",
    ]
    for statement in statements:
        database.execute(statement, (info.SerializeToString(),) if "?" in statement else ())
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        # the stream has no session yet: the first writer gets one without takeover
        assert open_run(stub, "old", takeover=False, world_size=1).acked_sequence == 3
        assert push(stub, record("old", 4)).acks[0].acked_sequence == 4
    assert database.rows(dialect.read_version) == [(SCHEMA_VERSION,)]
    assert database.rows("SELECT run_id, records, kind FROM runs") == [("old", 1, "")]
