"""A real gRPC MonitorService on 127.0.0.1 whose behaviour tests can script.

It implements the wire contract (idempotent OpenRun, per-(run, rank)
contiguous acks, rejections, NOT_FOUND for unknown runs) in memory, and can be
told to fail calls with any status code (optionally with a RetryInfo), to
delay replies, to reject records, to lose its state, to stop and to restart
on the same port. With ``sessions=True`` it plays the server side of writer
sessions: OpenRun grants one per (run, rank) (ALREADY_EXISTS while another
is live, unless ``takeover``), Push and CloseRun must carry the current one
(FAILED_PRECONDITION otherwise), CloseRun ends it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc


@dataclass
class Failure:
    code: grpc.StatusCode
    details: str = "scripted failure"
    retry_delay_s: float | None = None


@dataclass
class Call:
    method: str
    time: float
    code: grpc.StatusCode
    records: int = 0


@dataclass
class ScriptedServicer(monitor_pb2_grpc.MonitorServiceServicer):  # type: ignore[misc]
    """In-memory MonitorService with scripted failures (thread-safe)."""

    token: str | None = None
    delay_s: float = 0.0
    delay_method: str | None = None  # None: delay every method
    # the next N answers of a method go out only after the call has ended (the client's
    # deadline passed): the call was carried out, the client never sees the answer
    late: dict[str, int] = field(default_factory=dict)
    reject: Callable[[monitor_pb2.StepRecord], tuple[str, str] | None] | None = None
    # failures served before normal behaviour, in order, for any method (or one method)
    script: list[tuple[str | None, Failure]] = field(default_factory=list)
    # when set, every call fails with it
    always: Failure | None = None
    runs: dict[str, monitor_pb2.RunInfo] = field(default_factory=dict)
    stored: dict[tuple[str, int], dict[int, monitor_pb2.StepRecord]] = field(default_factory=dict)
    rejected: dict[tuple[str, int], set[int]] = field(default_factory=dict)
    closed: dict[tuple[str, int], str] = field(default_factory=dict)
    received: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # writer sessions (off by default: the older wire contract)
    sessions: bool = False
    keep_sessions: bool = True  # False: forget each session as soon as it is granted
    writers: dict[tuple[str, int], str] = field(default_factory=dict)
    opens: list[monitor_pb2.OpenRunRequest] = field(default_factory=list)
    sessions_seen: list[tuple[str, str]] = field(default_factory=list)  # (method, session)

    # ------------------------------------------------------------ scripting

    def fail_next(self, failure: Failure, *, method: str | None = None, times: int = 1) -> None:
        with self.lock:
            self.script.extend([(method, failure)] * times)

    def lose_state(self) -> None:
        with self.lock:
            self.runs.clear()
            self.stored.clear()
            self.rejected.clear()

    def take_over(self, run_id: str, rank: int = 0) -> str:
        """Another writer takes the stream over; returns its session."""
        with self.lock:
            session = uuid.uuid4().hex
            self.writers[(run_id, rank)] = session
            return session

    def forget_sessions(self) -> None:
        """What a restart of a server holding sessions in memory does."""
        with self.lock:
            self.writers.clear()

    def sequences(self, run_id: str, rank: int = 0) -> list[int]:
        with self.lock:
            return sorted(self.stored.get((run_id, rank), {}))

    def steps(self, run_id: str, rank: int = 0) -> list[int]:
        with self.lock:
            records = self.stored.get((run_id, rank), {})
            return [records[s].step for s in sorted(records)]

    def acked(self, run_id: str, rank: int = 0) -> int:
        with self.lock:
            return self._acked((run_id, rank))

    def call_log(self, method: str | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if method is None or c.method == method]

    # ------------------------------------------------------------ helpers

    def _acked(self, key: tuple[str, int]) -> int:
        done = set(self.stored.get(key, {})) | self.rejected.get(key, set())
        acked = 0
        while acked + 1 in done:
            acked += 1
        return acked

    def _gate(self, method: str, context: grpc.ServicerContext, records: int = 0) -> None:
        """Apply auth, delay and the failure script; abort the call when scripted."""
        failure: Failure | None = None
        with self.lock:
            if self.token is not None:
                metadata = dict(context.invocation_metadata())
                if metadata.get("authorization") != f"Bearer {self.token}":
                    failure = Failure(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
            if failure is None and self.always is not None:
                failure = self.always
            if failure is None:
                for i, (only, scripted) in enumerate(self.script):
                    if only is None or only == method:
                        failure = scripted
                        del self.script[i]
                        break
            code = grpc.StatusCode.OK if failure is None else failure.code
            self.calls.append(Call(method, time.monotonic(), code, records))
        if self.delay_s and self.delay_method in (None, method):
            time.sleep(self.delay_s)
        if failure is not None:
            _abort(context, failure)

    def _answer_late(self, method: str, context: grpc.ServicerContext) -> None:
        """Hold the answer until the call has ended (at most 30 s), for ``late`` methods."""
        with self.lock:
            late = self.late.get(method, 0)
            if late:
                self.late[method] = late - 1
        if late:
            ended = threading.Event()
            if context.add_callback(ended.set) and context.is_active():
                ended.wait(timeout=30.0)

    # ------------------------------------------------------------ service

    def OpenRun(
        self, request: monitor_pb2.OpenRunRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.OpenRunResponse:
        self._gate("OpenRun", context)
        session = ""
        with self.lock:
            run = request.run
            key = (run.run_id, request.rank)
            self.opens.append(request)
            if self.sessions:
                if key in self.writers and not request.takeover:
                    busy = f"run {run.run_id!r} rank {request.rank} has a live writer"
                else:
                    busy = ""
                    session = self.writers[key] = uuid.uuid4().hex
                    if not self.keep_sessions:
                        del self.writers[key]
            self.runs.setdefault(run.run_id, run)
            acked = self._acked(key)
        if session == "" and self.sessions:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, busy)
        self._answer_late("OpenRun", context)
        return monitor_pb2.OpenRunResponse(
            run_id=run.run_id,
            display_name=f"{run.name}-shown",
            acked_sequence=acked,
            writer_session=session,
        )

    def _session_refused(self, method: str, key: tuple[str, int], session: str) -> str | None:
        """Why ``session`` may not write ``key`` (None: it may); lock held."""
        self.sessions_seen.append((method, session))
        if not self.sessions:
            return None
        current = self.writers.get(key)
        if current is None:
            return f"unknown writer session for run {key[0]!r} rank {key[1]}: call OpenRun"
        if current != session:
            return f"run {key[0]!r} rank {key[1]} was taken over by another writer"
        return None

    def Push(
        self, request: monitor_pb2.PushRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.PushResponse:
        self._gate("Push", context, len(request.records))
        response = monitor_pb2.PushResponse()
        refusal: str | None = None
        with self.lock:
            for record in request.records:
                if record.run_id not in self.runs:
                    unknown = record.run_id
                    break
            else:
                unknown = None
            if unknown is None and request.records:
                first = request.records[0]
                refusal = self._session_refused(
                    "Push", (first.run_id, first.rank), request.writer_session
                )
            if unknown is None and refusal is None:
                keys: set[tuple[str, int]] = set()
                for record in request.records:
                    key = (record.run_id, record.rank)
                    keys.add(key)
                    self.received[(record.run_id, record.rank, record.sequence)] += 1
                    stored = self.stored.setdefault(key, {})
                    refused = self.rejected.setdefault(key, set())
                    if record.sequence in stored or record.sequence in refused:
                        response.duplicates += 1
                        continue
                    reason = self.reject(record) if self.reject else None
                    if reason is not None:
                        refused.add(record.sequence)
                        response.rejected.add(
                            run_id=record.run_id,
                            rank=record.rank,
                            sequence=record.sequence,
                            field=reason[0],
                            reason=reason[1],
                        )
                        continue
                    stored[record.sequence] = record
                    response.accepted += 1
                for run_id, rank in sorted(keys):
                    response.acks.add(
                        run_id=run_id, rank=rank, acked_sequence=self._acked((run_id, rank))
                    )
        if unknown is not None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown run {unknown!r}: call OpenRun")
        if refusal is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return response

    def CloseRun(
        self, request: monitor_pb2.CloseRunRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.CloseRunResponse:
        self._gate("CloseRun", context)
        key = (request.run_id, request.rank)
        with self.lock:
            refused = self._session_refused("CloseRun", key, request.writer_session)
            if refused is None:
                self.closed[key] = request.status
                self.writers.pop(key, None)
            acked = self._acked(key)
        if refused is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused)
        return monitor_pb2.CloseRunResponse(acked_sequence=acked)


def _abort(context: grpc.ServicerContext, failure: Failure) -> None:
    if failure.retry_delay_s is not None:
        seconds = int(failure.retry_delay_s)
        nanos = round((failure.retry_delay_s - seconds) * 1e9)
        info = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
        )
        status = status_pb2.Status(code=failure.code.value[0], message=failure.details)
        status.details.add().Pack(info)
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(failure.code, failure.details)


class ServerHandle:
    """Runs a ScriptedServicer on 127.0.0.1; can stop and restart on the same port."""

    def __init__(self, servicer: ScriptedServicer | None = None) -> None:
        self.servicer = servicer or ScriptedServicer()
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerHandle:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(self.servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"could not bind 127.0.0.1:{self.port}"
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def restart(self) -> None:
        self.stop()
        for _ in range(50):  # the port may take a moment to free up
            try:
                self.start()
                return
            except (AssertionError, RuntimeError):
                time.sleep(0.1)
        raise RuntimeError(f"could not restart on port {self.port}")


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def stats(i: int) -> dict[str, float]:
    """A valid stats mapping whose values encode ``i``."""
    return {
        "spearman": -0.5 + i * 1e-6,
        "pearson": -0.4,
        "n": 64,
        "entropy_mean": 1.0 + i,
        "score_mean": 2.0,
    }


FAST = {
    "flush_interval_s": 0.05,
    "backoff_initial_s": 0.02,
    "backoff_max_s": 0.2,
    "rpc_timeout_s": 2.0,
    "close_timeout_s": 0.5,
}
