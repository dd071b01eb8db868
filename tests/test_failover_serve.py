"""Failover between two real ``inversion-monitor serve`` processes on separate SQLite files.

What the takeover and exactly-once rules imply without a shared store: every record
reaches one of the two servers; the records the first server acknowledged before it was
killed are never resent to the second (the client forgot them when they were
acknowledged); the records in flight at the kill (sent, answer lost) are resent to the
second and may be in both files: at most one send window. Exactly once across replicas
needs them to share one store (``serve --db postgresql://...``), whose sequence
de-duplication drops those resends.
"""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path

from inversion_monitor import MonitorClient, TelemetryWarning
from tests.scripted_server import FAST, stats
from tests.server_support import free_port, wait_until
from tests.test_telemetry_e2e import ServeProcess, _stored


def _steps(db: Path, run_id: str) -> list[int]:
    return [step for _, step in _stored(db, run_id)]


def test_sigkill_of_the_first_server_moves_the_stream_to_the_second(tmp_path: Path) -> None:
    first = ServeProcess(tmp_path / "a.db").start()
    second = ServeProcess(tmp_path / "b.db").start()
    total, batch = 5000, 100
    client = MonitorClient(
        f"{first.endpoint},{second.endpoint}",
        "failover",
        run_id="failover",
        batch_size=batch,
        spool_dir=tmp_path / "spool",
        **FAST,
    )
    slowest_log = 0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            for step in range(total):
                started = time.perf_counter()
                client.log(step, stats(step), loss=1.0 / (step + 1))
                slowest_log = max(slowest_log, time.perf_counter() - started)
                if step == 2000:
                    wait_until("deliveries to the first", lambda: client.report().delivered >= 1000)
                    acked_before_kill = client.report().delivered
                    first.kill()  # SIGKILL while records are in flight
                    killed_at = time.monotonic()
            wait_until("records on the second", lambda: _stored(second.db, "failover"), 30)
            failover_s = time.monotonic() - killed_at
            assert client.flush(timeout_s=60)
        report = client.close(timeout_s=10)
    finally:
        client.close(timeout_s=0)
        first.kill()
        second.stop()
    assert (report.logged, report.delivered, report.dropped, report.spooled) == (total, total, 0, 0)
    assert client.current_endpoint == second.endpoint and client.failovers == 1
    on_first, on_second = _steps(first.db, "failover"), _steps(second.db, "failover")
    assert sorted(set(on_first) | set(on_second)) == list(range(total))  # nothing lost
    assert len(on_first) == len(set(on_first)) and len(on_second) == len(set(on_second))
    # what the first acknowledged before the kill never went to the second
    assert not set(range(acked_before_kill)) & set(on_second)
    # resent after the kill: only what was in flight, one window at most
    overlap = set(on_first) & set(on_second)
    assert len(overlap) <= batch, sorted(overlap)
    # the second numbers the moved stream from 1, contiguously, in step order
    assert [seq for seq, _ in _stored(second.db, "failover")] == list(range(1, len(on_second) + 1))
    assert on_second == sorted(on_second)
    assert slowest_log < 0.5  # the training loop never waited for the failover
    print(
        f"failover {failover_s:.2f}s, first {len(on_first)}, second {len(on_second)}, "
        f"resent to both {len(overlap)}, slowest log {slowest_log * 1e3:.1f} ms"
    )


def test_the_first_server_down_at_start(tmp_path: Path) -> None:
    second = ServeProcess(tmp_path / "b.db").start()
    dead = f"127.0.0.1:{free_port()}"
    try:
        client = MonitorClient(f"{dead},{second.endpoint}", "down", run_id="down", **FAST)
        for step in range(500):
            client.log(step, stats(step))
        assert client.flush(timeout_s=60)
        report = client.close(timeout_s=10)
        assert (report.delivered, report.dropped) == (500, 0)
        assert _stored(second.db, "down") == [(seq, seq - 1) for seq in range(1, 501)]
        assert client.failovers == 1 and not client.warnings
    finally:
        second.stop()


def test_a_frozen_first_server_fails_over_on_the_deadline(tmp_path: Path) -> None:
    """SIGSTOP: the connection stays open and nothing answers (a hung machine); the
    call's deadline moves the client to the second server."""
    first = ServeProcess(tmp_path / "a.db").start()
    second = ServeProcess(tmp_path / "b.db").start()
    total, batch = 2000, 100
    options = {**FAST, "rpc_timeout_s": 1.0}
    client = MonitorClient(
        f"{first.endpoint},{second.endpoint}",
        "frozen",
        run_id="frozen",
        batch_size=batch,
        **options,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            for step in range(total):
                client.log(step, stats(step))
                if step == 500:
                    wait_until("deliveries to the first", lambda: client.report().delivered >= 200)
                    assert first.process is not None
                    first.process.send_signal(signal.SIGSTOP)
                    stopped_at = time.monotonic()
            wait_until("records on the second", lambda: _stored(second.db, "frozen"), 30)
            failover_s = time.monotonic() - stopped_at
            assert client.flush(timeout_s=60)
        report = client.close(timeout_s=10)
        assert first.process is not None
        first.process.send_signal(signal.SIGCONT)
    finally:
        client.close(timeout_s=0)
        if first.process is not None:
            first.process.send_signal(signal.SIGCONT)
        first.stop()
        second.stop()
    assert (report.delivered, report.dropped) == (total, 0)
    assert client.current_endpoint == second.endpoint and client.failovers == 1
    on_first, on_second = _steps(first.db, "frozen"), _steps(second.db, "frozen")
    assert sorted(set(on_first) | set(on_second)) == list(range(total))
    assert len(set(on_first) & set(on_second)) <= batch
    print(f"frozen: failover {failover_s:.2f}s (rpc_timeout_s {options['rpc_timeout_s']})")
