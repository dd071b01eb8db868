"""Cost of ``MonitorClient.log`` per call, in microseconds (goal: <= 50 us).

Cases: a live loopback server (``inversion-monitor serve`` in a subprocess;
stats as ``InversionStats`` and as a mapping; the per-step health record alone
(a mapping of loss, grad_norm, learning_rate; and with the seven RL keys too);
with a write-ahead spool, where
every call also writes the record to the spool file), a dead endpoint with a full
queue (every call drops the oldest record), and a dead endpoint with a spool
(every call spills to disk). Then the translation alone, in-process: building
and serialising one ``StepRecord`` (health-only vs a probe record), in
microseconds per record and records per second.

    .venv/bin/python benchmarks/bench_client.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.metrics.stats import InversionStats

GOAL_US = 50.0


@contextlib.contextmanager
def _serve(db: Path) -> Iterator[str]:
    """``inversion-monitor serve`` in a subprocess (its own GIL); yields its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "inversion_monitor.app.cli", "serve", "--db", str(db),
         "--grpc-address", "127.0.0.1:0", "--http-address", "off", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("grpc listening on "):
                yield line.split()[-1]
                break
        else:
            raise RuntimeError("inversion-monitor serve did not start")
    finally:
        process.terminate()
        process.wait(30)


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

    rows = []
    with tempfile.TemporaryDirectory() as tmp, _serve(Path(tmp) / "bench.db") as endpoint:
        live = MonitorClient(endpoint, "bench", run_id="bench-live", max_buffer=100_000)
        rows.append(
            _row(
                "live server, InversionStats",
                _time_calls(lambda i: live.log(i, stats, loss=2.0), args.calls),
            )
        )
        rows.append(
            _row("live server, mapping", _time_calls(lambda i: live.log(i, mapping), args.calls))
        )
        rows.append(
            _row(
                "live server, health only (3 keys)",
                _time_calls(lambda i: live.log(i, HEALTH), args.calls),
            )
        )
        rows.append(
            _row(
                "live server, health only (RL: 10 keys)",
                _time_calls(lambda i: live.log(i, RL_HEALTH), args.calls),
            )
        )
        flushed = live.flush(timeout_s=60)
        report = live.close(timeout_s=10)
        delivered = f"(flush {flushed}, delivered {report.delivered}/{report.logged})"
        with tempfile.TemporaryDirectory() as spool_dir:
            ahead = MonitorClient(
                endpoint, "bench", run_id="bench-ahead", max_buffer=100_000, spool_dir=spool_dir
            )
            rows.append(
                _row(
                    "live server, write-ahead spool",
                    _time_calls(lambda i: ahead.log(i, stats, loss=2.0), args.calls),
                )
            )
            ahead.flush(timeout_s=60)
            report = ahead.close(timeout_s=10)
            delivered += f" (spool: delivered {report.delivered}/{report.logged})"

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
    _encode_costs(stats, args.calls)


HEALTH = {"loss": 2.31, "grad_norm": 0.84, "learning_rate": 3e-4}
RL_HEALTH = {
    **HEALTH,
    "reward_mean": 0.42,
    "reward_std": 0.2,
    "policy_entropy_mean": 1.1,
    "entropy_covariance": 0.003,
    "kl": 0.02,
    "clip_ratio": 0.01,
    "completion_length_mean": 96.0,
}


def _encode_costs(stats: InversionStats, calls: int) -> None:
    """step_record + SerializeToString per record, health-only vs probe, in-process."""
    from inversion_monitor.telemetry.wire import step_record

    def encode(
        stats_value: InversionStats | None, health: dict[str, float]
    ) -> Callable[[int], None]:
        def one(i: int) -> None:
            step_record(
                run_id="bench", rank=0, step=i, wall_time=1.0, stats=stats_value, health=health
            ).SerializeToString()

        return one

    cases = [
        ("health only (3 keys)", encode(None, HEALTH)),
        ("health only (RL: 10 keys)", encode(None, RL_HEALTH)),
        ("probe record + health (3 keys)", encode(stats, HEALTH)),
    ]
    print(f"\nencode (step_record + SerializeToString), {calls} records each, in-process")
    print(f"{'case':<44} {'median us':>9} {'records/s':>11}")
    for name, one in cases:
        samples = _time_calls(one, calls)
        median = statistics.median(samples)
        print(f"{name:<44} {median:>9.2f} {1e6 / median:>11,.0f}")


if __name__ == "__main__":
    main()
