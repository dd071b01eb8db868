"""Helpers shared by the tests/test_server_*.py files (a real server on loopback)."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import subprocess
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server import MonitorServer, ServerConfig

TIMEOUT = 10.0


def wait_until(what: str, condition: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; fail naming
    ``what`` once ``timeout_s`` has passed (a deadline, never a bare sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ready_process(command: list[str], url: str, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server binary, wait until ``url + "/-/ready"`` answers 200, stop it after."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return False

    try:
        wait_until(f"{name} to become ready", ready)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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


# stub -> (run_id, rank) -> the writer session its last OpenRun granted
_SESSIONS: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], str]] = weakref.WeakKeyDictionary()


def open_run(
    stub: monitor_pb2_grpc.MonitorServiceStub,
    run_id: str = "run1",
    rank: int = 0,
    *,
    takeover: bool = True,
    **kw: Any,
) -> monitor_pb2.OpenRunResponse:
    """OpenRun as the stream's (resuming) writer: ``takeover`` by default; keeps the session."""
    request = monitor_pb2.OpenRunRequest(run=run_info(run_id, **kw), rank=rank, takeover=takeover)
    response: monitor_pb2.OpenRunResponse = stub.OpenRun(request, timeout=TIMEOUT)
    _SESSIONS.setdefault(stub, {})[(run_id, rank)] = response.writer_session
    return response


def session(stub: monitor_pb2_grpc.MonitorServiceStub, run_id: str = "run1", rank: int = 0) -> str:
    """The writer session ``open_run`` got for (run_id, rank) on this stub ("" if none)."""
    return _SESSIONS.get(stub, {}).get((run_id, rank), "")


def push_request(
    stub: monitor_pb2_grpc.MonitorServiceStub, *records: monitor_pb2.StepRecord
) -> monitor_pb2.PushRequest:
    """A PushRequest of one (run, rank) with the session ``open_run`` got for it."""
    first = records[0] if records else None
    token = session(stub, first.run_id, first.rank) if first is not None else ""
    return monitor_pb2.PushRequest(records=list(records), writer_session=token)


def close_run(
    stub: monitor_pb2_grpc.MonitorServiceStub, run_id: str = "run1", rank: int = 0, status: str = ""
) -> monitor_pb2.CloseRunResponse:
    """CloseRun with the session ``open_run`` got for (run_id, rank)."""
    request = monitor_pb2.CloseRunRequest(
        run_id=run_id, rank=rank, status=status, writer_session=session(stub, run_id, rank)
    )
    response: monitor_pb2.CloseRunResponse = stub.CloseRun(request, timeout=TIMEOUT)
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


_FIELD_INDEX = re.compile(r"^records\[(\d+)\]")


def push(
    stub: monitor_pb2_grpc.MonitorServiceStub, *records: monitor_pb2.StepRecord
) -> monitor_pb2.PushResponse:
    """Push ``records`` with the sessions ``open_run`` got: one Push per (run, rank), merged.

    The merged response names rejected fields by their index in ``records``.
    """
    streams: dict[tuple[str, int], list[int]] = {}
    for i, rec in enumerate(records):
        streams.setdefault((rec.run_id, rec.rank), []).append(i)
    if len(streams) <= 1:
        one: monitor_pb2.PushResponse = stub.Push(push_request(stub, *records), timeout=TIMEOUT)
        return one
    merged = monitor_pb2.PushResponse()
    for indices in streams.values():
        part: monitor_pb2.PushResponse = stub.Push(
            push_request(stub, *(records[i] for i in indices)), timeout=TIMEOUT
        )
        merged.acks.extend(part.acks)
        for rejected in part.rejected:
            rejected.field = _FIELD_INDEX.sub(
                lambda m, idx=indices: f"records[{idx[int(m.group(1))]}]",  # type: ignore[misc]
                rejected.field,
            )
            merged.rejected.append(rejected)
        merged.accepted += part.accepted
        merged.duplicates += part.duplicates
    return merged


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


# ---------------------------------------------------------------- hypothesis

RUN_IDS = ["fuzz-a", "fuzz-b"]
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 1 + 1e-12, -1.5, 1e308, -1e-300]
)
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def step_records(draw: Any) -> monitor_pb2.StepRecord:
    rec = monitor_pb2.StepRecord(
        run_id=draw(st.sampled_from(RUN_IDS) | st.text(max_size=70)),
        rank=draw(st.integers(0, 6) | u32),
        sequence=draw(st.integers(0, 40) | st.integers(0, 2**64 - 1)),
        step=draw(st.integers(-(2**63), 2**63 - 1)),
        wall_time=draw(floats),
    )
    if draw(st.booleans()):
        for corr in (rec.inversion.spearman, rec.inversion.pearson):
            for name in ("value", "ci_low", "ci_high"):
                if draw(st.booleans()):
                    setattr(corr, name, draw(floats))
        rec.inversion.n = draw(u32)
        rec.inversion.confidence = draw(floats)
        rec.inversion.insufficient_reason = draw(st.text(max_size=300))
    for summary in (rec.entropy, rec.score):
        for name in ("mean", "p10", "p50", "p90"):
            if draw(st.booleans()):
                setattr(summary, name, draw(floats))
    for name in ("loss", "learning_rate", "probe_seconds", "spearman_per_token_type"):
        if draw(st.booleans()):
            setattr(rec, name, draw(floats))
    for _ in range(draw(st.integers(0, 10))):
        rec.components.add(
            layer=draw(u32),
            projection=draw(st.sampled_from(["q", "k", "v", "o", "", "qq"])),
            spearman=draw(floats),
            score_mean=draw(floats),
        )
    for _ in range(draw(st.integers(0, 10))):
        rec.samples.add(entropy=draw(f32), score=draw(f32), token_id=draw(u32))
    return rec


_CORR_ODD = [math.nan, math.inf, -math.inf, 1 + 1e-9, -1 - 1e-9, 1 + 1e-3, -1.5]
_NONNEG_ODD = [math.nan, math.inf, -math.inf, -1e-9, -2.0]
# (path to the message, field, odd values) for one injected fault
ODD_TARGETS: list[tuple[str, str, list[Any]]] = [
    ("", "step", [-1]),
    ("", "wall_time", [0.0, math.nan, -1.0, math.inf]),
    *(
        ("inversion." + c, f, _CORR_ODD)
        for c in ("spearman", "pearson")
        for f in ("value", "ci_low", "ci_high")
    ),
    ("inversion", "confidence", [1.0, math.nan, -0.1]),
    ("inversion", "insufficient_reason", ["x" * 300]),
    *((m, f, _NONNEG_ODD) for m in ("entropy", "score") for f in ("mean", "p10", "p50", "p90")),
    ("", "entropy_covariance", [math.nan, math.inf]),
    ("", "loss", [math.nan, -math.inf]),
    ("", "grad_norm", [math.nan, math.inf, -1.0, -1e-9]),
    ("", "kl", [math.nan, -math.inf]),
    ("", "clip_ratio", [1.5, 1.0 + 1e-9, -0.1, math.nan]),
    ("", "completion_length_mean", [-1.0, math.inf]),
    ("", "reward_mean", [math.nan]),
    ("", "learning_rate", _NONNEG_ODD),
    ("", "probe_seconds", _NONNEG_ODD),
    ("", "spearman_per_token_type", _CORR_ODD),
    ("components.0", "spearman", _CORR_ODD),
    ("components.0", "score_mean", _NONNEG_ODD),
    ("components.0", "projection", ["x", ""]),
    ("samples.0", "entropy", [math.nan, -1.0]),
    ("samples.0", "score", [math.inf, -1.0]),
]


@st.composite
def plausible_records(draw: Any) -> monitor_pb2.StepRecord:
    """A record a real client sends, usually with one odd value injected somewhere."""
    corr, nonneg = st.floats(-1.0, 1.0), st.floats(0.0, 1e9)
    rec = monitor_pb2.StepRecord(
        run_id=RUN_IDS[0],
        sequence=draw(st.integers(1, 100)),
        step=draw(st.integers(0, 10**9)),
        wall_time=draw(st.floats(1.0, 2e9)),
    )
    for msg in (rec.inversion.spearman, rec.inversion.pearson):
        for name in ("value", "ci_low", "ci_high"):
            if draw(st.booleans()):
                setattr(msg, name, draw(corr))
    rec.inversion.confidence = draw(st.sampled_from([0.0, 0.9, 0.95]))
    for msg in (rec.entropy, rec.score):
        for name in ("mean", "p10", "p50", "p90"):
            if draw(st.booleans()):
                setattr(msg, name, draw(nonneg))
    if draw(st.booleans()):
        rec.loss = draw(st.floats(-1e3, 1e3))
    if draw(st.booleans()):
        rec.learning_rate = draw(nonneg)
    if draw(st.booleans()):
        rec.spearman_per_token_type = draw(corr)
    for _ in range(draw(st.integers(0, 4))):
        rec.components.add(
            layer=draw(st.integers(0, 40)),
            projection=draw(st.sampled_from("qkvo")),
            spearman=draw(corr),
            score_mean=draw(nonneg),
        )
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            rec.samples.add(entropy=draw(nonneg), score=draw(nonneg), token_id=7)
    if draw(st.integers(0, 3)):  # three times out of four: one odd value
        path, field, odd = draw(st.sampled_from(ODD_TARGETS))
        inject(rec, path, field, draw(st.sampled_from(odd)))
    return rec


def inject(rec: monitor_pb2.StepRecord, path: str, field: str, value: Any) -> None:
    """Set ``path.field`` of ``rec`` (``components.0``: the first element, made if needed)."""
    msg: Any = rec
    for part in path.split(".") if path else ():
        if part.isdigit():
            msg = msg[0] if len(msg) else msg.add()
            if msg.DESCRIPTOR.name == "ComponentStats" and not msg.projection:
                msg.projection = "q"
        else:
            msg = getattr(msg, part)
    setattr(msg, field, value)
