"""The distributed tests' launchers give up on time and leave no process behind.

A rank left running (waiting on a peer, or on a lock its killed peer held) would hold
ports, CPU and, for spawned ranks, the test session's exit, which joins its children.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from tests.dist_runs import launch, spawn_ranks

_FOREVER = (  # a launcher and its child, both blocked until a signal ends them
    "import signal, subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()'])\n"
    "print(child.pid, flush=True)\n"
    "signal.pause()\n"
)


def _gone(pid: int, within_s: float = 30.0) -> bool:
    """``pid`` exits (or is left a zombie) before the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_a_launch_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    started = time.monotonic()
    run = launch([sys.executable, "-c", _FOREVER], tmp_path, timeout=5)
    assert time.monotonic() - started < 60
    assert run.proc.returncode == -9
    assert "killed after 5 s" in run.proc.stderr
    child = int(run.proc.stdout.split()[0])
    assert _gone(child), f"the launcher's child {child} outlived the timeout"


def _children() -> set[int]:
    """This process's live children, but multiprocessing's resource tracker (started with
    the first spawned process, kept for the session)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return {
        pid
        for pid in pids
        if not _gone(pid, within_s=0.0) and b"resource_tracker" not in _cmdline(pid)
    }


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _sleep_forever(rank: int, marker: str) -> None:
    signal.pause()  # until the deadline's kill


def _fail_on_rank_one(rank: int, marker: str) -> None:
    if rank == 1:
        raise ValueError("rank 1 broke")
    signal.pause()  # until its peer's failure stops it


def test_spawned_ranks_past_their_timeout_are_killed(tmp_path: Path) -> None:
    before = _children()
    with pytest.raises(TimeoutError, match="ranks still running after 8 s"):
        spawn_ranks(_sleep_forever, (str(tmp_path),), timeout=8)
    assert _children() <= before


def test_a_rank_that_raises_fails_the_call_and_stops_its_peer() -> None:
    started = time.monotonic()
    with pytest.raises(Exception, match="rank 1 broke"):
        spawn_ranks(_fail_on_rank_one, ("",), timeout=120)
    assert time.monotonic() - started < 100
