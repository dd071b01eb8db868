"""A fork beside a busy MonitorClient: how long it waits, and whether children crash.

Two measurements, side by side in one run:

1. **Wait.** The server hangs every ``Push`` (``--hang-s``); the parent forks
   while a call is in flight. Reported: the time ``os.fork()`` takes in the
   parent with the client's fork handling (goal <= 100 ms; it used to wait for
   the call, up to 2 s) and without a client.
2. **Crashes.** The server answers each ``Push`` after ``--delay-ms``, the
   client logs without pause, so a call is almost always in flight; the
   parent forks ``--forks`` short-lived children (they never use gRPC) and
   counts those killed by a signal, once with the client's fork handling and
   once with it switched off (the baseline gRPC hazard). It also counts the
   forks gRPC itself saw with a call in flight (its log line "Other threads
   are currently calling into gRPC, skipping fork() handlers", read from the
   process's stderr): the state in which children can crash.

    .venv/bin/python -m benchmarks.bench_client_fork [--forks 600]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.telemetry.sender import Sender

STATS = {"spearman": -0.5, "pearson": -0.4, "n": 64, "entropy_mean": 1.0, "score_mean": 2.0}


def _serve(delay_s: float) -> None:
    """Child mode: a scripted server delaying every Push; prints its port."""
    from tests.scripted_server import ScriptedServicer, ServerHandle

    handle = ServerHandle(ScriptedServicer(delay_s=delay_s, delay_method="Push")).start()
    print(handle.port, flush=True)
    signal.sigwait({signal.SIGTERM})
    handle.stop()


@contextlib.contextmanager
def _server(delay_s: float) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_client_fork", "--serve", str(delay_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield f"127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.terminate()
        process.wait(30)


def _fork_and_reap(work: bool = False) -> tuple[float, int]:
    """Fork a child that exits at once; (seconds os.fork took in the parent, exit status)."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if work:
            sum(range(1000))
        os._exit(0)
    took = time.perf_counter() - started
    _, status = os.waitpid(pid, 0)
    return took, status


def measure_wait(hang_s: float, forks: int) -> dict[str, float]:
    with _server(hang_s) as endpoint:
        client = MonitorClient(endpoint, "fork-wait", run_id="fork-wait", rpc_timeout_s=60)
        client.log(0, STATS)
        client.flush(timeout_s=0.3)  # the first Push is now in flight (hangs hang_s)
        with_client = []
        for i in range(forks):
            client.log(i + 1, STATS)
            client.flush(timeout_s=0.05)  # a resend is in flight again
            with_client.append(_fork_and_reap()[0])
        client.close(timeout_s=0)
    without = [_fork_and_reap()[0] for _ in range(forks)]
    return {
        "with_client_max_ms": max(with_client) * 1e3,
        "with_client_median_ms": statistics.median(with_client) * 1e3,
        "no_client_max_ms": max(without) * 1e3,
    }


@contextlib.contextmanager
def _stderr_lines() -> Iterator[list[str]]:
    """Capture what the process (gRPC's C core included) writes to file descriptor 2."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())


def measure_crashes(delay_ms: float, forks: int, *, handling: bool) -> tuple[int, int, int]:
    """(children killed by a signal, exited non-zero, forks gRPC saw mid-call)."""
    original = Sender.before_fork
    if not handling:
        Sender.before_fork = lambda self: None  # type: ignore[method-assign]
    try:
        with _server(delay_ms / 1e3) as endpoint:
            client = MonitorClient(
                endpoint, "fork-crash", run_id=f"fork-crash-{handling}", batch_size=5
            )
            stop = threading.Event()

            def keep_logging() -> None:
                step = 0
                while not stop.is_set():
                    client.log(step, STATS)
                    step += 1
                    time.sleep(0.001)

            logger = threading.Thread(target=keep_logging, daemon=True)
            logger.start()
            signalled = failed = 0
            with _stderr_lines() as lines:
                for _ in range(forks):
                    _, status = _fork_and_reap(work=True)
                    if os.WIFSIGNALED(status):
                        signalled += 1
                    elif os.waitstatus_to_exitcode(status) != 0:
                        failed += 1
            busy = sum("skipping fork() handlers" in line for line in lines)
            stop.set()
            logger.join()
            client.close(timeout_s=1)
    finally:
        Sender.before_fork = original  # type: ignore[method-assign]
    return signalled, failed, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--forks", type=int, default=600)
    parser.add_argument("--wait-forks", type=int, default=20)
    parser.add_argument("--hang-s", type=float, default=5.0)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve)
        return
    warnings.simplefilter("ignore", TelemetryWarning)
    wait = measure_wait(args.hang_s, args.wait_forks)
    print(
        f"fork wait, server hanging {args.hang_s:.0f} s per Push, {args.wait_forks} forks: "
        f"max {wait['with_client_max_ms']:.1f} ms, median {wait['with_client_median_ms']:.1f} "
        f"ms (goal <= 100 ms); without a client max {wait['no_client_max_ms']:.1f} ms"
    )
    for handling in (True, False):
        signalled, failed, busy = measure_crashes(args.delay_ms, args.forks, handling=handling)
        name = "with fork handling" if handling else "handling switched off"
        print(
            f"{name}: {busy} of {args.forks} forks made while gRPC had a call in flight; "
            f"children: {signalled} killed by a signal, {failed} exited non-zero "
            f"(Push answered after {args.delay_ms:g} ms, logging without pause)"
        )


if __name__ == "__main__":
    main()
