"""Retry policy of MonitorClient: which codes retry, backoff, RetryInfo, shutdown."""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterator

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.telemetry.retry import RETRYABLE_CODES, classify
from tests.scripted_server import FAST, Failure, ScriptedServicer, ServerHandle, stats, wait_for
from tests.server_support import free_port, wait_until

STOPPING = [
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
]


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    handle = ServerHandle().start()
    yield handle
    handle.stop()


def test_every_status_code_is_classified() -> None:
    expected = {
        "UNAVAILABLE": "retry",
        "DEADLINE_EXCEEDED": "retry",
        "RESOURCE_EXHAUSTED": "retry",
        "ABORTED": "retry",
        "INTERNAL": "retry",
        "UNKNOWN": "retry",
        "CANCELLED": "retry",
        "NOT_FOUND": "reopen",
        "UNAUTHENTICATED": "stop",
        "PERMISSION_DENIED": "stop",
        "INVALID_ARGUMENT": "stop",
        "UNIMPLEMENTED": "stop",
        "FAILED_PRECONDITION": "stop",
        "ALREADY_EXISTS": "stop",
        "OUT_OF_RANGE": "stop",
        "DATA_LOSS": "stop",
    }
    codes = {c.name: classify(c) for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
    assert codes == expected


@pytest.mark.parametrize("code", sorted(RETRYABLE_CODES, key=lambda c: c.name))
def test_retryable_codes_are_retried_until_delivered(
    server: ServerHandle, code: grpc.StatusCode
) -> None:
    servicer = server.servicer
    servicer.fail_next(Failure(code, "transient"), method="Push", times=3)
    client = MonitorClient(server.endpoint, "retry", run_id="retry", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        for step in range(20):
            client.log(step, stats(step))
        assert client.flush(timeout_s=20)
    report = client.close(timeout_s=5)
    pushes = [c.code for c in servicer.call_log("Push")]
    assert pushes[:3] == [code] * 3 and pushes[3] == grpc.StatusCode.OK
    assert servicer.steps("retry") == list(range(20))
    assert report.delivered == 20


@pytest.mark.parametrize("code", STOPPING)
def test_stopping_codes_warn_once_and_stop_sending(
    server: ServerHandle, code: grpc.StatusCode
) -> None:
    servicer = server.servicer
    servicer.always = Failure(code, "refused")
    client = MonitorClient(server.endpoint, "stop", run_id="stop", **FAST)
    with pytest.warns(TelemetryWarning, match=f"refused run stop \\({code.name}") as caught:
        client.log(0, stats(0))
        assert wait_for(lambda: len(servicer.call_log()) >= 1)
        started = time.monotonic()
        assert not client.flush(timeout_s=5)  # answers at once: nothing will be sent
        assert time.monotonic() - started < 2
        for step in range(1, 50):
            client.log(step, stats(step))  # keeps buffering, never raises
        report = client.close(timeout_s=1)  # the sender has stopped: anything it sent is logged
    assert len(servicer.call_log()) == 1  # no retry, not even at close
    assert sum("refused" in str(w.message) for w in caught) == 1
    assert (report.logged, report.delivered, report.dropped) == (50, 0, 50)


def test_retry_info_delay_is_honoured(server: ServerHandle) -> None:
    servicer = server.servicer
    servicer.fail_next(
        Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_delay_s=0.8), method="Push"
    )
    client = MonitorClient(server.endpoint, "ri", run_id="ri", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        client.log(0, stats(0))
        assert client.flush(timeout_s=10)
    client.close(timeout_s=5)
    pushes = servicer.call_log("Push")
    assert [c.code for c in pushes] == [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK]
    gap = pushes[1].time - pushes[0].time
    assert 0.75 <= gap < 3.0, gap  # the server's delay, not the 20 ms backoff


def test_backoff_grows_exponentially_with_jitter(server: ServerHandle) -> None:
    servicer = server.servicer
    servicer.fail_next(Failure(grpc.StatusCode.UNAVAILABLE, "down"), method="Push", times=5)
    client = MonitorClient(
        server.endpoint,
        "exp",
        run_id="exp",
        **{**FAST, "backoff_initial_s": 0.05, "backoff_max_s": 10.0},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        client.log(0, stats(0))
        assert client.flush(timeout_s=20)
    client.close(timeout_s=5)
    times = [c.time for c in servicer.call_log("Push")]
    assert len(times) == 6
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for n, gap in enumerate(gaps):
        assert gap >= 0.8 * 0.05 * 2**n - 0.01, (n, gaps)
        assert gap <= 1.2 * 0.05 * 2**n + 0.5, (n, gaps)  # loose: a loaded machine is slow


def test_backoff_is_capped(server: ServerHandle) -> None:
    servicer = server.servicer
    servicer.fail_next(Failure(grpc.StatusCode.UNAVAILABLE, "down"), method="Push", times=6)
    client = MonitorClient(
        server.endpoint,
        "cap",
        run_id="cap",
        **{**FAST, "backoff_initial_s": 0.05, "backoff_max_s": 0.1},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        client.log(0, stats(0))
        assert client.flush(timeout_s=20)
    client.close(timeout_s=5)
    times = [c.time for c in servicer.call_log("Push")]
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.12 + 0.3


def test_deadline_exceeded_is_retried() -> None:
    handle = ServerHandle(ScriptedServicer(delay_s=1.0, delay_method="Push")).start()
    try:
        client = MonitorClient(handle.endpoint, "dl", run_id="dl", **{**FAST, "rpc_timeout_s": 0.2})
        with pytest.warns(TelemetryWarning, match="DEADLINE_EXCEEDED"):
            client.log(0, stats(0))
            assert not client.flush(timeout_s=0.5)
        handle.servicer.delay_s = 0.0
        assert client.flush(timeout_s=10)
        client.close(timeout_s=5)
        assert handle.servicer.sequences("dl") == [1]
    finally:
        handle.stop()


def test_close_during_long_backoff_returns_promptly(server: ServerHandle) -> None:
    server.servicer.always = Failure(grpc.StatusCode.UNAVAILABLE, "down")
    client = MonitorClient(
        server.endpoint,
        "bo",
        run_id="bo",
        **{**FAST, "backoff_initial_s": 30.0, "backoff_max_s": 60.0},
    )
    with pytest.warns(TelemetryWarning, match="UNAVAILABLE") as caught:
        client.log(0, stats(0))
        # the sender warns as it handles the failure, then sleeps the ~30 s backoff
        wait_until("the UNAVAILABLE warning", lambda: len(caught) >= 1, timeout_s=10)
        started = time.monotonic()
        report = client.close(timeout_s=10)
    assert time.monotonic() - started < 1.0  # the retry would come after the deadline
    assert report.dropped == 1


def test_close_with_short_backoff_keeps_retrying_until_its_deadline(server: ServerHandle) -> None:
    server.servicer.always = Failure(grpc.StatusCode.UNAVAILABLE, "down")
    client = MonitorClient(server.endpoint, "bo2", run_id="bo2", **FAST)
    with pytest.warns(TelemetryWarning):
        client.log(0, stats(0))
        started = time.monotonic()
        report = client.close(timeout_s=0.6)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5, elapsed
    assert report.dropped == 1
    assert len(server.servicer.call_log()) >= 3


def test_close_cancels_a_slow_call() -> None:
    handle = ServerHandle(ScriptedServicer(delay_s=5.0, delay_method="Push")).start()
    try:
        client = MonitorClient(
            handle.endpoint, "slow", run_id="slow", **{**FAST, "rpc_timeout_s": 30.0}
        )
        client.log(0, stats(0))
        assert wait_for(lambda: len(handle.servicer.call_log("Push")) >= 1)
        started = time.monotonic()
        report = client.close(timeout_s=0.3)
        assert time.monotonic() - started < 1.5
        assert report.dropped == 1
    finally:
        handle.stop()


def test_absent_server_never_raises_and_warns_once() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    client = MonitorClient(endpoint, "absent", run_id="absent", **FAST)
    with pytest.warns(TelemetryWarning, match="cannot deliver telemetry") as caught:
        for step in range(200):
            client.log(step, stats(step))
        assert not client.flush(timeout_s=0.5)
    assert sum("cannot deliver" in str(w.message) for w in caught) == 1
    report = client.close(timeout_s=0.2)
    assert (report.logged, report.delivered, report.dropped) == (200, 0, 200)


def test_server_appearing_later_receives_everything() -> None:
    handle = ServerHandle()
    handle.port = free_port()
    client = MonitorClient(handle.endpoint, "late", run_id="late", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        for step in range(100):
            client.log(step, stats(step))
        # the sender thread warns on its first failed call: wait for it (a loaded machine).
        # The client's own record, not the process's warning registry, which an earlier
        # test (or the sender thread racing this block) may already have used up
        assert wait_for(lambda: any("cannot deliver" in m for m in client.warnings), 30)
        assert not client.flush(timeout_s=0.3)
    handle.start()
    try:
        for step in range(100, 150):
            client.log(step, stats(step))
        assert client.flush(timeout_s=20)
        client.close(timeout_s=5)
        assert handle.servicer.steps("late") == list(range(150))
    finally:
        handle.stop()


def test_retrying_leaves_the_process_random_state_untouched() -> None:
    """Backoff jitter comes from the library's own generator (issue 26 #8)."""
    import random

    import numpy as np
    import torch

    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    before = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    client = MonitorClient(f"127.0.0.1:{free_port()}", "seeded", run_id="seeded", **FAST)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            for step in range(20):
                client.log(step, stats(step))
            # the warning follows the first backoff; wait for a few more retries after it
            assert wait_for(lambda: any("cannot deliver" in m for m in client.warnings), 30)
            assert not client.flush(timeout_s=0.5)
    finally:
        client.close(timeout_s=0)
    after = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    assert after[0] == before[0]
    assert all(np.array_equal(a, b) for a, b in zip(after[1], before[1], strict=True))
    assert torch.equal(after[2], before[2])
