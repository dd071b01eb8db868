"""Helpers shared by the tests/test_server_*.py files (a real server on loopback)."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server import MonitorServer, ServerConfig

TIMEOUT = 10.0


def config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "db": tmp_path / "monitor.db",
    }
    values.update(overrides)
    return ServerConfig(**values)


@contextlib.contextmanager
def running(tmp_path: Path, **overrides: Any) -> Iterator[MonitorServer]:
    server = MonitorServer(config(tmp_path, **overrides)).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def stub_for(
    server: MonitorServer, token: str | None = None
) -> Iterator[monitor_pb2_grpc.MonitorServiceStub]:
    channel = grpc.insecure_channel(server.grpc_target)
    if token is not None:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    with channel:
        yield monitor_pb2_grpc.MonitorServiceStub(channel)


class _Bearer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        details = details._replace(metadata=tuple(details.metadata or ()) + self._metadata)
        return continuation(details, request)


def run_info(run_id: str = "run1", name: str = "demo run", **kw: Any) -> monitor_pb2.RunInfo:
    values: dict[str, Any] = {"project": "proj", "world_size": 2, "framework": "custom"}
    values.update(kw)
    return monitor_pb2.RunInfo(run_id=run_id, name=name, **values)


def open_run(
    stub: monitor_pb2_grpc.MonitorServiceStub, run_id: str = "run1", rank: int = 0, **kw: Any
) -> monitor_pb2.OpenRunResponse:
    request = monitor_pb2.OpenRunRequest(run=run_info(run_id, **kw), rank=rank)
    response: monitor_pb2.OpenRunResponse = stub.OpenRun(request, timeout=TIMEOUT)
    return response


def record(
    run_id: str = "run1",
    sequence: int = 1,
    *,
    step: int | None = None,
    rank: int = 0,
    spearman: float | None = -0.5,
    entropy: float | None = 2.0,
    **kw: Any,
) -> monitor_pb2.StepRecord:
    rec = monitor_pb2.StepRecord(
        run_id=run_id,
        rank=rank,
        sequence=sequence,
        step=sequence * 10 if step is None else step,
        wall_time=1_700_000_000.0 + sequence,
        **kw,
    )
    if spearman is not None:
        rec.inversion.spearman.value = spearman
        rec.inversion.spearman.ci_low = max(-1.0, spearman - 0.1)
        rec.inversion.spearman.ci_high = min(1.0, spearman + 0.1)
        rec.inversion.pearson.value = spearman / 2
        rec.inversion.n = 512
        rec.inversion.confidence = 0.95
    if entropy is not None:
        rec.entropy.mean = entropy
        rec.entropy.p10 = entropy / 2
        rec.entropy.p50 = entropy
        rec.entropy.p90 = entropy * 1.5
        rec.score.mean = 0.25
    return rec


def push(
    stub: monitor_pb2_grpc.MonitorServiceStub, *records: monitor_pb2.StepRecord
) -> monitor_pb2.PushResponse:
    response: monitor_pb2.PushResponse = stub.Push(
        monitor_pb2.PushRequest(records=list(records)), timeout=TIMEOUT
    )
    return response


def acks(response: monitor_pb2.PushResponse) -> dict[tuple[str, int], int]:
    return {(a.run_id, a.rank): a.acked_sequence for a in response.acks}


def scrape_text(server: MonitorServer) -> str:
    assert server.http_url is not None
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=TIMEOUT) as resp:
        body: bytes = resp.read()
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` for every sample of the exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def run_sample(text: str, name: str, run: str) -> float | None:
    return samples(text).get((name, (("run", run),)))


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The ``grpc.RpcError`` that ``call(*args, **kwargs)`` raises (fails if none)."""
    try:
        call(*args, timeout=TIMEOUT, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} did not fail")
