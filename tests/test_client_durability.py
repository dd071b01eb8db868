"""The spool under hostile conditions, against ``inversion-monitor serve``.

A client process SIGKILLed right after ``log()`` returned loses nothing (the
next client with that spool sends everything, exactly once), and a full or
read-only disk never raises into ``log()``. The disk is a small tmpfs mounted inside
a user and mount namespace (``unshare -rm``): no root needed where
unprivileged user namespaces are enabled (most Linux distributions).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inversion_monitor import MonitorClient
from tests.scripted_server import FAST
from tests.server_support import free_port
from tests.test_telemetry_e2e import ServeProcess, _stored

REPO = Path(__file__).resolve().parents[1]


def _child(
    endpoint: str, spool: Path, run_id: str, count: int, max_buffer: int, wrap: list[str]
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.client_child", endpoint, str(spool), run_id]
    return subprocess.Popen(
        [*wrap, *command, str(count), str(max_buffer)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        assert process.stderr is not None
        raise AssertionError(f"the client process died: {process.stderr.read()[-3000:]}")
    answer: dict[str, Any] = json.loads(line)
    assert "raised" not in answer, answer
    return answer


def test_sigkill_right_after_log_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "monitor.db"
    server = ServeProcess(db).start()
    total = 5000
    try:
        child = _child(server.endpoint, tmp_path / "spool", "killed", total, 10_000, [])
        logged = _line(child)
        child.send_signal(signal.SIGKILL)  # right after the last log() returned
        child.wait(10)
        assert logged["report"]["logged"] == total
        before = len(_stored(db, "killed"))
        assert before < total  # most records were still only in the client
        resumed = MonitorClient(
            server.endpoint, "killed", run_id="killed", spool_dir=tmp_path / "spool", **FAST
        )
        assert resumed.flush(timeout_s=60)
        report = resumed.close(timeout_s=10)
        assert report.replayed + before >= total and report.dropped == 0
        assert _stored(db, "killed") == [(seq, seq - 1) for seq in range(1, total + 1)]
        assert not (tmp_path / "spool" / "killed.rank0.spool").exists()
    finally:
        server.stop()


def _unshare() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("the full-disk test needs util-linux 'unshare' (user + mount namespaces)")
    probe = subprocess.run(
        [unshare, "-rm", "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.fail(f"unprivileged user namespaces are disabled here: {probe.stderr.strip()}")
    return [unshare, "-rm"]


@pytest.mark.parametrize(("max_buffer", "count"), [(5000, 2000), (200, 2000)])
def test_a_full_disk_never_raises_and_loses_nothing_written(
    tmp_path: Path, max_buffer: int, count: int
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    port = free_port()  # the server starts only after the disk is full
    mount = f'mount -t tmpfs -o size=64k tmpfs {spool} && exec "$@"'
    child = _child(
        f"127.0.0.1:{port}",
        spool,
        "full",
        count,
        max_buffer,
        [*_unshare(), "sh", "-c", mount, "sh"],
    )
    server = ServeProcess(tmp_path / "monitor.db", port=port)
    try:
        first = _line(child)
        report = first["report"]
        spool_warnings = [m for m in first["warnings"] if "cannot write the telemetry spool" in m]
        assert len(spool_warnings) == 1 and "No space left on device" in spool_warnings[0]
        assert report["logged"] == count and report["spool_errors"] > 0
        server.start()
        assert child.stdin is not None
        child.stdin.write("flush\n")
        child.stdin.flush()
        final = _line(child)["report"]
        assert child.wait(30) == 0
        stored = _stored(tmp_path / "monitor.db", "full")
        assert final["delivered"] == len(stored) == count - final["dropped"]
        assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
        steps = [step for _, step in stored]
        assert steps == sorted(set(steps))  # in order, none twice
        if max_buffer >= count:  # memory held what the disk refused
            assert final["dropped"] == 0
        else:  # the disk held what memory could not: all of it arrived
            assert final["dropped"] == count - len(stored) > 0
            assert steps[: len(steps) - max_buffer] == list(range(len(steps) - max_buffer))
    finally:
        child.kill()
        server.stop()


def test_a_read_only_spool_folder_never_raises_and_delivers_from_memory(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    port = free_port()
    mount = f'mount -t tmpfs tmpfs {spool} && mount -o remount,ro {spool} && exec "$@"'
    wrap = [*_unshare(), "sh", "-c", mount, "sh"]
    child = _child(f"127.0.0.1:{port}", spool, "ro", 300, 1000, wrap)
    server = ServeProcess(tmp_path / "monitor.db", port=port)
    try:
        first = _line(child)
        (warning,) = [m for m in first["warnings"] if "no telemetry spool" in m]
        assert "Read-only file system" in warning
        server.start()
        assert child.stdin is not None
        child.stdin.write("flush\n")
        child.stdin.flush()
        final = _line(child)
        assert final["flushed"] and final["report"]["delivered"] == 300
        assert child.wait(30) == 0
        assert _stored(tmp_path / "monitor.db", "ro") == [(s, s - 1) for s in range(1, 301)]
    finally:
        child.kill()
        server.stop()
