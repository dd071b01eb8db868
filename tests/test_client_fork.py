"""Fork safety: a child never reuses the parent's channel, spool or thread."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from tests.scripted_server import FAST, ServerHandle, stats, wait_for
from tests.server_support import wait_until


def _wait_child(pid: int, timeout_s: float = 60.0) -> int:
    statuses: list[int] = []

    def exited() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses.append(status)
        return bool(done)

    try:
        wait_until("the forked child to exit", exited, timeout_s)
    except AssertionError:  # it hung: do not leave it behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(statuses[0])


def _child(parent: MonitorClient, endpoint: str, spool: Path) -> None:
    """Runs in the child; any failure becomes a non-zero exit code."""
    assert parent._sender._channel is None and parent._sender._stub is None
    assert parent._thread is None and parent._window.spool is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parent.log(999, stats(999))  # inert in the child: dropped, never sent
    assert any("forked child" in str(w.message) for w in caught)
    started = time.monotonic()
    inherited = parent.close(timeout_s=5)
    assert time.monotonic() - started < 1.0
    assert (inherited.logged, inherited.dropped) == (0, 1)
    assert not spool.exists() or spool.stat().st_size >= 0  # untouched, still the parent's
    own = MonitorClient(endpoint, "child", run_id="child", **FAST)
    for step in range(20):
        own.log(step, stats(step))
    assert own.flush(timeout_s=20)
    assert own.close(timeout_s=5).delivered == 20


@pytest.mark.parametrize("with_spool", [False, True])
def test_forked_child_gets_fresh_state_and_its_own_client_works(
    tmp_path: Path, with_spool: bool
) -> None:
    handle = ServerHandle().start()
    try:
        parent = MonitorClient(
            handle.endpoint,
            "parent",
            run_id="parent",
            spool_dir=tmp_path if with_spool else None,
            **FAST,
        )
        for step in range(10):
            parent.log(step, stats(step))
        assert parent.flush(timeout_s=10)  # the parent's channel exists and is in use
        spool = tmp_path / "parent.rank0.spool"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                signal.alarm(50)
                _child(parent, handle.endpoint, spool)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        for step in range(10, 30):  # the parent keeps going meanwhile
            parent.log(step, stats(step))
        assert _wait_child(pid) == 0
        assert parent.flush(timeout_s=10)
        report = parent.close(timeout_s=5)
        assert report.delivered == 30
        assert handle.servicer.steps("parent") == list(range(30))  # 999 never arrived
        assert wait_for(lambda: handle.servicer.steps("child") == list(range(20)))
    finally:
        handle.stop()


def test_child_at_fork_does_not_deadlock_on_a_held_lock() -> None:
    handle = ServerHandle().start()
    try:
        client = MonitorClient(handle.endpoint, "lock", run_id="lock", **FAST)
        client.log(0, stats(0))
        assert client.flush(timeout_s=10)  # gRPC idle at the fork (see the client docstring)
        with client._window.lock:  # fork while the lock is held (as by the sender thread)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                signal.alarm(20)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TelemetryWarning)
                    client.log(0, stats(0))
                    client.flush(timeout_s=1)
                    client.close(timeout_s=1)
                os._exit(0)
        assert _wait_child(pid, timeout_s=30) == 0
        client.close(timeout_s=5)
    finally:
        handle.stop()


def test_a_fork_during_a_hanging_call_does_not_wait_for_it_and_loses_nothing() -> None:
    """The call in flight is cancelled for the fork and resent after it."""
    handle = ServerHandle().start()
    servicer = handle.servicer
    try:
        client = MonitorClient(
            handle.endpoint, "hang", run_id="hang", **{**FAST, "rpc_timeout_s": 30.0}
        )
        client.log(0, stats(0))
        assert client.flush(timeout_s=10)  # the run is open
        servicer.delay_s, servicer.delay_method = 3.0, "Push"  # the server hangs
        for step in range(1, 10):
            client.log(step, stats(step))
        assert not client.flush(timeout_s=0.01)
        assert wait_for(lambda: len(servicer.call_log("Push")) == 2)  # in flight now
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(0)
        took = time.monotonic() - started  # before: until the call ended (capped at 2 s)
        assert _wait_child(pid) == 0
        assert took < 1.5
        assert wait_for(lambda: len(servicer.call_log("Push")) == 3)  # resent after the fork
        servicer.delay_s = 0.0
        assert client.flush(timeout_s=30)  # once the hanging handlers return
        assert client.close(timeout_s=5).delivered == 10
        assert servicer.steps("hang") == list(range(10))
    finally:
        handle.stop()
