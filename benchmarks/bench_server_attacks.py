"""The issue-26 attacks measured side by side, before (the old code path) and after.

1. redaction: a 65,000-letter config value through the old backtracking URL and
   JWT patterns and through :func:`redact_text` (same inputs, one run).
2. OpenRun: that value in ``config_json`` of a real server on loopback, with a
   ``/healthz`` issued meanwhile from another thread.
3. history: ``GET /api/runs/<run>?history=N`` of a run of ``--records`` records
   with 4,096 token samples each: bytes, seconds and peak RSS growth of the
   answer the server builds now (newest records under ``max_history_bytes``,
   streamed a record at a time) and of the whole history built as one JSON
   document (the path before), in this process.
4. idle connections: ``--idle`` sockets that never send a byte; whether
   ``/healthz`` answers meanwhile and how long until the server closes them.

Usage: ``python benchmarks/bench_server_attacks.py [--records 300] [--idle 200]``.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server import Limits, MonitorServer, ServerConfig
from inversion_monitor.server.api import to_json
from inversion_monitor.server.redact import redact_text
from inversion_monitor.server.store import connect, read_history

# the patterns before issue 26 (quadratic on the inputs below)
_OLD_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+(?=@)")
_OLD_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
VALUES = {"letters": "a" * 65_000, "jwt-like": "-eyJ" * 16_250}


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_redaction() -> None:
    print("1. redaction of a 65,000-character value (s)")
    for name, value in VALUES.items():
        start = time.perf_counter()
        _OLD_JWT.search(value)
        _OLD_URL.sub("", value)
        before = time.perf_counter() - start
        start = time.perf_counter()
        redact_text(value)
        after = time.perf_counter() - start
        ratio = before / after
        print(f"   {name:9s} before {before:7.3f}  after {after:7.4f}  ratio {ratio:6.0f}x")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as resp:
        body: bytes = resp.read()
    return body


def bench_server(records: int, idle: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    cfg = ServerConfig(
        grpc_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        db=tmp / "m.db",
        limits=Limits(http_timeout_s=2.0),
    )
    with MonitorServer(cfg) as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        assert server.http_url is not None
        health: list[float] = []

        def healthz() -> None:
            start = time.perf_counter()
            _get(server.http_url + "/healthz")
            health.append(time.perf_counter() - start)

        print("2. OpenRun with the value in config_json (s)")
        for name, value in VALUES.items():
            info = monitor_pb2.RunInfo(
                run_id=f"long-{name}", name=name, config_json=json.dumps({"v": value})
            )
            probe = threading.Timer(0.005, healthz)
            probe.start()
            start = time.perf_counter()
            stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=60)
            took = time.perf_counter() - start
            probe.join()
            print(f"   {name:9s} OpenRun {took:.3f}  /healthz meanwhile {health[-1]:.3f}")

        opened = stub.OpenRun(
            monitor_pb2.OpenRunRequest(run=monitor_pb2.RunInfo(run_id="big", name="big")),
            timeout=10,
        )
        for seq in range(1, records + 1):
            rec = monitor_pb2.StepRecord(run_id="big", sequence=seq, step=seq, wall_time=1e9)
            for j in range(4096):
                rec.samples.add(entropy=1.0 + j / 4096, score=0.5, token_id=j)
            push = monitor_pb2.PushRequest(records=[rec], writer_session=opened.writer_session)
            stub.Push(push, timeout=30)
        print(f"3. GET history of {records} records x 4,096 samples")
        _rss_peak_reset()
        base = _rss_mb()
        start = time.perf_counter()
        body = _get(f"{server.http_url}/api/runs/big?history={records}")
        took = time.perf_counter() - start
        kept = body.count(b'"sequence"') - 1  # not parsed here: the server's memory is measured
        print(
            f"   after : {len(body) / 1e6:7.1f} MB JSON, {kept} newest records, {took:6.2f} s, "
            f"peak RSS +{_rss_peak_mb() - base:7.1f} MB"
        )
        del body
        conn = connect(cfg.db)
        _rss_peak_reset()
        base = _rss_mb()
        start = time.perf_counter()
        view = server.ingestor.views["big"]
        response = monitor_pb2.GetRunResponse()
        response.history.extend(
            monitor_pb2.StepRecord.FromString(p) for p in read_history(conn, view.pk, records)
        )
        data = json.dumps(to_json(response), separators=(",", ":")).encode()
        took = time.perf_counter() - start
        print(
            f"   before: {len(data) / 1e6:7.1f} MB JSON, {records} records, {took:6.2f} s, "
            f"peak RSS +{_rss_peak_mb() - base:7.1f} MB"
        )
        del data, response
        conn.close()

        print(f"4. {idle} idle HTTP connections (http_timeout_s=2)")
        host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
        socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(idle)]
        start = time.perf_counter()
        _get(server.http_url + "/healthz")
        print(f"   /healthz meanwhile: {time.perf_counter() - start:.3f} s")
        start = time.perf_counter()
        for sock in socks:
            sock.recv(1)  # returns b"" once the server closes it (or 503 text)
        print(f"   all closed by the server after {time.perf_counter() - start:.1f} s")
        for sock in socks:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--idle", type=int, default=200)
    args = parser.parse_args()
    bench_redaction()
    bench_server(args.records, args.idle)


if __name__ == "__main__":
    main()
