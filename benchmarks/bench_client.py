"""Cost of ``MonitorClient.log`` per call, in microseconds (goal: <= 50 us).

Cases: a live loopback server (stats as ``InversionStats`` and as a mapping),
a dead endpoint with a full queue (every call drops the oldest record), and a
dead endpoint with a spool (every call spills to disk).

    .venv/bin/python benchmarks/bench_client.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import math
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.stats import InversionStats

GOAL_US = 50.0


class _AckingServicer(monitor_pb2_grpc.MonitorServiceServicer):  # type: ignore[misc]
    """Acknowledges every record (the cost of storing is the server's business)."""

    def __init__(self) -> None:
        self.acked: dict[tuple[str, int], int] = {}

    def OpenRun(self, request: Any, context: Any) -> monitor_pb2.OpenRunResponse:
        key = (request.run.run_id, request.rank)
        return monitor_pb2.OpenRunResponse(
            run_id=request.run.run_id, acked_sequence=self.acked.get(key, 0)
        )

    def Push(self, request: Any, context: Any) -> monitor_pb2.PushResponse:
        response = monitor_pb2.PushResponse(accepted=len(request.records))
        last = request.records[-1]
        self.acked[(last.run_id, last.rank)] = last.sequence
        response.acks.add(run_id=last.run_id, rank=last.rank, acked_sequence=last.sequence)
        return response

    def CloseRun(self, request: Any, context: Any) -> monitor_pb2.CloseRunResponse:
        return monitor_pb2.CloseRunResponse()


def _stats() -> InversionStats:
    return InversionStats(
        method="spearman",
        n=512,
        spearman=-0.61,
        pearson=-0.55,
        spearman_ci=(-0.66, -0.55),
        pearson_ci=(-0.61, -0.49),
        confidence=0.95,
        insufficient=False,
        reason=None,
        entropy_mean=1.4,
        entropy_p10=0.05,
        entropy_p50=1.1,
        entropy_p90=3.2,
        score_mean=5.1,
        score_p50=4.2,
        score_p90=11.0,
    )


def _time_calls(log: Callable[[int], None], calls: int) -> list[float]:
    for i in range(min(1000, calls)):  # warm up
        log(i)
    out = []
    clock = time.perf_counter_ns
    for i in range(calls):
        start = clock()
        log(i)
        out.append((clock() - start) / 1000.0)
    return out


def _row(name: str, samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
    median = statistics.median(samples)
    verdict = "ok" if median <= GOAL_US else "OVER GOAL"
    return f"{name:<44} {median:>9.1f} {p99:>9.1f} {samples[-1]:>9.0f}  {verdict}"


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    stats = _stats()
    mapping = {
        "spearman": -0.61,
        "pearson": -0.55,
        "n": 512,
        "entropy_mean": 1.4,
        "score_mean": 5.1,
    }
    warnings.simplefilter("ignore", TelemetryWarning)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    monitor_pb2_grpc.add_MonitorServiceServicer_to_server(_AckingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rows = []
    try:
        live = MonitorClient(f"127.0.0.1:{port}", "bench", run_id="bench-live")
        rows.append(
            _row(
                "live server, InversionStats",
                _time_calls(lambda i: live.log(i, stats, loss=2.0), args.calls),
            )
        )
        rows.append(
            _row("live server, mapping", _time_calls(lambda i: live.log(i, mapping), args.calls))
        )
        flushed = live.flush(timeout_s=60)
        report = live.close(timeout_s=10)
        delivered = f"(flush {flushed}, delivered {report.delivered}/{report.logged})"
    finally:
        server.stop(grace=None)

    dead = MonitorClient(_dead_endpoint(), "bench", run_id="bench-dead", max_buffer=1000)
    rows.append(
        _row(
            "dead endpoint, full queue (drop oldest)",
            _time_calls(lambda i: dead.log(i, stats), args.calls),
        )
    )
    dropped = dead.close(timeout_s=0.1).dropped
    with tempfile.TemporaryDirectory() as spool_dir:
        spill = MonitorClient(
            _dead_endpoint(), "bench", run_id="bench-spool", max_buffer=1000, spool_dir=spool_dir
        )
        rows.append(
            _row(
                "dead endpoint, full queue, spool (spill)",
                _time_calls(lambda i: spill.log(i, stats), args.calls),
            )
        )
        spooled = spill.close(timeout_s=0.1).spooled

    print(f"MonitorClient.log cost per call, {args.calls} calls each (goal <= {GOAL_US:.0f} us)")
    print(f"{'case':<44} {'median':>9} {'p99':>9} {'max':>9}  (microseconds)")
    for row in rows:
        print(row)
    print(f"live: {delivered}; dead: {dropped} dropped; spool: {spooled} spooled")


if __name__ == "__main__":
    main()
