"""The telemetry client's sender thread: OpenRun, Push, CloseRun, retries, sessions.

:class:`Sender` runs in one daemon thread per client. It takes numbered
batches from the :class:`~inversion_monitor.telemetry.window.SendWindow`, pushes them
through a channel of the :class:`~inversion_monitor.telemetry.transport.Transport`,
resolves the window with each acknowledgement and applies the policies of
:mod:`inversion_monitor.telemetry.client` (retry, re-open, stop, writer sessions).

Writer sessions: ``OpenRun`` grants a session for the (run, rank) stream;
every ``Push`` and ``CloseRun`` carries it. ``takeover`` is sent only by a
client resuming a non-empty spool of that stream. ``ALREADY_EXISTS`` from
``OpenRun`` (another live writer) stops sending, except right after an
``OpenRun`` of this client that may have been granted without its answer
arriving (a timeout, a dropped connection, a call cancelled for a fork): that
session is this client's own, so it re-opens once with ``takeover``;
``FAILED_PRECONDITION`` from
``Push`` (taken over, or a session the server forgot in a restart) re-opens
once, and stops when it comes again before anything was delivered.

Failover: with several endpoints (see :mod:`inversion_monitor.telemetry.endpoints`)
``UNAVAILABLE`` (connection refused, a killed server) and ``DEADLINE_EXCEEDED``
move the sender to the next endpoint, round-robin: at once while some endpoint
has not failed since the last success, after the usual backoff once all have.
The window, the spool and the writer session move with it: the next ``Push``
carries the session (replicas of one store honour it), ``NOT_FOUND`` and
``FAILED_PRECONDITION`` re-open the run as above, and ``ALREADY_EXISTS`` from
that ``OpenRun`` takes the stream over once, because the live writer is this
client's session on the endpoint it left. The re-opened run tells which
records the store already holds; everything else is resent.

Fork: a fork never waits more than :data:`FORK_WAIT_S` on the sender. A call
in flight is cancelled (the server de-duplicates its resend) and the fork
waits until gRPC has finished it, so the child is forked with an idle channel
(forking in the middle of a call can crash the child inside gRPC's fork
handlers, even a child that never uses gRPC: about 1 fork in 150 in a stress
loop with grpcio 1.85 before this handling); new calls wait for the fork.
``benchmarks/bench_client_fork.py`` measures the wait and counts the forks
gRPC saw mid-call. Children that never use gRPC (DataLoader workers) are
also safe with ``GRPC_ENABLE_FORK_SUPPORT=0`` set before Python starts.

>>> issubclass(TelemetryWarning, RuntimeWarning)
True
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.telemetry.endpoints import Rotation
from inversion_monitor.telemetry.retry import CallFailure, backoff_s, classify, retry_delay_s
from inversion_monitor.telemetry.transport import Transport
from inversion_monitor.telemetry.window import SendWindow

logger = logging.getLogger("inversion_monitor.telemetry.client")

RunStatus = Literal["completed", "failed", "interrupted"]
# the longest a fork waits for the sender (cancelling a call in flight)
FORK_WAIT_S = 0.1


class TelemetryWarning(RuntimeWarning):
    """Telemetry is degraded (server unreachable, records dropped or refused).

    Training is never interrupted; the warning says what happened and the fix.
    """


class Warner:
    """Warns once per key (a ``TelemetryWarning`` and a log line); repeats go to debug."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        # the messages warned, in order (what this client said, whatever the process's
        # warning filters and registries did with them)
        self.messages: list[str] = []

    def once(self, key: str, message: str) -> None:
        """Warn about ``key`` the first time only."""
        if key in self.warned:
            logger.debug(message)
            return
        self.warned.add(key)
        self.messages.append(message)
        logger.warning(message)
        warnings.warn(message, TelemetryWarning, stacklevel=3)


@dataclass(frozen=True)
class SenderSettings:
    """Batching, timing and retry knobs of the sender (validated by the client)."""

    flush_interval_s: float
    rpc_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float


class Aborted(Exception):
    """The client is shutting down; the call was cancelled."""


class _ForkCancelled(Exception):
    """The call was cancelled so that a fork need not wait; resend at once."""


_FIXES = {
    grpc.StatusCode.UNAUTHENTICATED: "check the token",
    grpc.StatusCode.PERMISSION_DENIED: "check the token's permissions",
    grpc.StatusCode.INVALID_ARGUMENT: "check the run settings (run_id, rank, labels)",
    grpc.StatusCode.UNIMPLEMENTED: "check that the endpoint is an inversion-monitor server",
    grpc.StatusCode.ALREADY_EXISTS: (
        "another client writes this run and rank; give each process its own rank or run_id "
        "(a resumed job takes the stream over by reusing the spool_dir)"
    ),
    grpc.StatusCode.FAILED_PRECONDITION: (
        "another client took this run and rank over; give each process its own rank or run_id"
    ),
}


# failures after which the server may have carried the call out
_OUTCOME_UNKNOWN = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
# failures after which a client with several endpoints tries the next one
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class Sender:
    """Delivers a :class:`SendWindow` to the server (see the module docstring)."""

    def __init__(
        self,
        endpoints: Rotation[Transport],
        window: SendWindow,
        run_info: monitor_pb2.RunInfo,
        *,
        rank: int,
        settings: SenderSettings,
        warner: Warner,
        takeover: bool,
    ) -> None:
        self.endpoints = endpoints
        self.window = window
        self.run_info = run_info
        self.run_id = run_info.run_id
        self.rank = rank
        self.settings = settings
        self.warner = warner
        self.display_name: str | None = None
        self.halted: str | None = None
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.abort = threading.Event()
        self.close_deadline: float | None = None
        self.close_status: RunStatus = "completed"
        self._takeover = takeover
        self._session = ""
        self._channel: grpc.Channel | None = None
        self._stub: monitor_pb2_grpc.MonitorServiceStub | None = None
        self._run_open = False
        self._outage = False
        self._attempt = 0
        self._not_found_in_a_row = 0
        self._session_reopened = False
        self._failed_method = ""
        # an OpenRun of this client may have been granted without the answer arriving
        self._open_unanswered = False
        # the writer session was granted by an endpoint this client has since left
        self._session_elsewhere = False
        # fork coordination: calls start under the gate; a fork holds it
        self._gate = threading.Lock()
        self._gate_held = False
        self._in_flight: tuple[grpc.Future, threading.Event] | None = None
        self._fork_cancelled = False
        self.forked = False

    @property
    def transport(self) -> Transport:
        """The transport of the endpoint in use."""
        return self.endpoints.current

    # ------------------------------------------------------------ the thread

    def run(self) -> None:
        """Thread target: send until closed, aborted or stopped."""
        try:
            self._loop()
        except Aborted:
            pass
        except Exception:  # pragma: no cover - a bug must not pass silently
            logger.exception("telemetry sender thread failed; records are no longer sent")
            self._stop("internal error")
        finally:
            with self.window.lock:
                self.window.changed.notify_all()

    def _loop(self) -> None:
        last_sync = time.monotonic()
        while not self.abort.is_set():
            now = time.monotonic()
            if now - last_sync >= self.settings.flush_interval_s:
                self.sync_spool()
                last_sync = now
            if self.halted is None:
                failure = self._drain()
                if failure is not None:
                    delay = self._handle_failure(failure)
                    if delay is not None and not self._sleep(delay):
                        return  # closing: the retry would come after close's deadline
                    continue
            if self.closing.is_set():
                if self.halted is None:
                    self._close_run()
                return
            self.wake.wait(self.settings.flush_interval_s)
            self.wake.clear()

    def _sleep(self, delay: float) -> bool:
        """Back off for ``delay`` seconds; False when closing makes retrying pointless."""
        until = time.monotonic() + delay
        while True:
            if self.abort.is_set():
                return False
            deadline = self.close_deadline
            if deadline is not None and until > deadline:
                return False
            remaining = until - time.monotonic()
            if remaining <= 0:
                return True
            event = self.abort if self.closing.is_set() else self.closing
            if not event.wait(min(remaining, self.settings.flush_interval_s)):
                self.sync_spool()  # long outages still fsync the spool each interval

    def sync_spool(self) -> None:
        """fsync the spool (outside the window's lock: ``log()`` never waits for it)."""
        spool = self.window.spool
        if spool is None:
            return
        try:
            spool.sync()
        except OSError as exc:
            self.warner.once("spool_io", f"cannot sync the telemetry spool {spool.path}: {exc}")

    # ------------------------------------------------------------ calls

    def _drain(self) -> CallFailure | None:
        """Open the run if needed and push until nothing is pending; a failure stops it."""
        while not self.abort.is_set():
            if not self._run_open:
                failure = self._open_run()
                if failure is not None:
                    return failure
            batch = self.window.next_batch()
            if batch.corrupt:
                self.warner.once("corrupt", f"{batch.corrupt} unreadable spool entries dropped")
            if not batch.records:
                return None
            request = monitor_pb2.PushRequest(records=batch.records, writer_session=self._session)
            result = self._call("Push", request)
            if isinstance(result, CallFailure):
                return result
            assert isinstance(result, monitor_pb2.PushResponse)
            if not self._on_push_response(result, batch.records[0].sequence):
                return CallFailure(grpc.StatusCode.ABORTED, "the server acknowledged nothing", None)
            self._on_success()
        return None

    def _open_run(self) -> CallFailure | None:
        request = monitor_pb2.OpenRunRequest(
            run=self.run_info, rank=self.rank, takeover=self._takeover
        )
        result = self._call("OpenRun", request)
        if isinstance(result, CallFailure):
            if result.code in _OUTCOME_UNKNOWN:  # the server may have granted it
                self._open_unanswered = True
            return result
        assert isinstance(result, monitor_pb2.OpenRunResponse)
        self._open_unanswered = False
        self._session_elsewhere = False
        self._takeover = False  # taken over once; later re-opens are this client's own
        self._session = result.writer_session
        self.display_name = result.display_name or self.display_name
        self.window.reopened(result.acked_sequence)
        self._run_open = True
        self._not_found_in_a_row = 0
        logger.debug(
            "opened run %s rank %d (server holds %d)", self.run_id, self.rank, result.acked_sequence
        )
        return None

    def _on_push_response(self, response: monitor_pb2.PushResponse, first_seq: int) -> bool:
        """Resolve acknowledged records; False when nothing moved."""
        acked: int | None = None
        for ack in response.acks:
            if ack.run_id == self.run_id and ack.rank == self.rank:
                acked = ack.acked_sequence
        if acked is None:
            return False
        rejected = {
            r.sequence: r
            for r in response.rejected
            if r.run_id == self.run_id and r.rank == self.rank
        }
        result = self.window.acknowledge(acked, rejected)
        if result.first_reject is not None:
            reject = result.first_reject
            self.warner.once(
                "rejected",
                f"the monitor server rejected records for good (e.g. sequence "
                f"{reject.sequence}: {reject.field}: {reject.reason}); they "
                "are counted in DeliveryReport.rejected and not resent.",
            )
        if acked < first_seq - 1:
            # The server holds less than it acknowledged before (it lost data):
            # re-open, which renumbers from its count.
            self._run_open = False
        return result.resolved > 0

    def _on_success(self) -> None:
        self._attempt = 0
        self._not_found_in_a_row = 0
        self._session_reopened = False
        self._session_elsewhere = False  # the endpoint in use honours the session
        self.endpoints.succeeded()
        if self._outage:
            self._outage = False
            logger.info("monitor server at %s reachable again", self.transport.endpoint)

    def _handle_failure(self, failure: CallFailure) -> float | None:
        """The delay before the next attempt, or None when this client stops sending."""
        code = failure.code
        if (
            code == grpc.StatusCode.FAILED_PRECONDITION
            and self._failed_method == "Push"
            and not self._session_reopened
        ):
            # The session is unknown (a server restart) or the stream was taken
            # over: re-open once; a live new writer answers ALREADY_EXISTS.
            self._session_reopened = True
            self._run_open = False
            logger.info(
                "monitor server refused the writer session of run %s rank %d (%s): re-opening",
                self.run_id,
                self.rank,
                failure.details,
            )
            return 0.0
        if (
            code == grpc.StatusCode.ALREADY_EXISTS
            and self._failed_method == "OpenRun"
            and (self._open_unanswered or self._session_elsewhere)
        ):
            # The live writer is most likely this client: an earlier OpenRun was granted
            # but its answer lost, or granted through the endpoint this client failed
            # over from. Take the stream over once (a writer that really is another
            # client then stops on its next Push and re-open).
            self._open_unanswered = False
            self._session_elsewhere = False
            self._takeover = True
            logger.info(
                "run %s rank %d is held by a writer session that is most likely this "
                "client's own (an OpenRun answer lost, or granted before a failover): "
                "taking the stream over",
                self.run_id,
                self.rank,
            )
            return 0.0
        action = classify(code)
        if action == "reopen":
            self._run_open = False
            self._not_found_in_a_row += 1
            if self._not_found_in_a_row == 1:
                logger.info("monitor server does not know run %s: re-opening it", self.run_id)
                return 0.0
        elif action == "stop":
            self._halt(failure)
            return None
        if code in FAILOVER_CODES and len(self.endpoints.items) > 1:
            if not self._fail_over(failure):
                return 0.0  # an endpoint not tried since the last success: at once
        elif code == grpc.StatusCode.UNAVAILABLE:
            self._reset_channel()
        delay = failure.retry_delay_s
        if delay is None:
            delay = backoff_s(
                self._attempt,
                initial_s=self.settings.backoff_initial_s,
                max_s=self.settings.backoff_max_s,
            )
            self._attempt += 1
        if not self._outage:
            self._outage = True
            message = (
                f"cannot deliver telemetry to the monitor server at {self._where()} "
                f"({code.name}: {failure.details}); records are buffered "
                f"(max_buffer={self.window.max_buffer}, "
                f"spool_dir={'set' if self.window.spool is not None else 'none'}) and retried "
                "in the background; training continues."
            )
            if "unreachable" in self.warner.warned:
                logger.warning(message)
            else:
                self.warner.once("unreachable", message)
        else:
            logger.debug("telemetry retry in %.2fs after %s", delay, code.name)
        return delay

    def _fail_over(self, failure: CallFailure) -> bool:
        """Move to the next endpoint; True when all failed in a row (back off first)."""
        left = self.transport.endpoint
        round_done = self.endpoints.fail_over()
        self._reset_channel()
        if self._session:
            self._session_elsewhere = True
        log = logger.warning if not self._outage else logger.info
        log(
            "monitor server at %s failed (%s: %s): run %s rank %d fails over to %s",
            left,
            failure.code.name,
            failure.details,
            self.run_id,
            self.rank,
            self.transport.endpoint,
        )
        return round_done

    def _where(self) -> str:
        """The endpoint, or the list of them."""
        endpoints = [t.endpoint for t in self.endpoints.items]
        return endpoints[0] if len(endpoints) == 1 else "any of " + ", ".join(endpoints)

    def _halt(self, failure: CallFailure) -> None:
        fix = _FIXES.get(failure.code, "check the client configuration and the server logs")
        keep = (
            "unsent records stay in the spool for a later replay with the same run_id and spool_dir"
            if self.window.spool is not None
            else f"up to max_buffer={self.window.max_buffer} records are kept, older ones "
            "dropped, none counted as delivered"
        )
        self.warner.once(  # before stopping: whoever waits on the stop sees the warning
            "halted",
            f"the monitor server at {self.transport.endpoint} refused run {self.run_id} "
            f"({failure.code.name}: {failure.details}) for rank {self.rank}: {fix}. This "
            f"client sends nothing more; {keep}. Training continues.",
        )
        self._stop(failure.code.name)

    def _stop(self, reason: str) -> None:
        with self.window.lock:
            self.halted = reason
            self.window.stopped = reason
            self.window.changed.notify_all()

    def _close_run(self) -> None:
        with self.window.lock:
            done = self._run_open and self.window.min_unresolved() >= self.window.next_idx
        if not done:
            return
        request = monitor_pb2.CloseRunRequest(
            run_id=self.run_id,
            rank=self.rank,
            status=self.close_status,
            writer_session=self._session,
        )
        result = self._call("CloseRun", request)
        if isinstance(result, CallFailure):
            logger.debug("CloseRun failed: %s %s", result.code.name, result.details)

    # ------------------------------------------------------------ transport

    def _ensure_stub(self) -> monitor_pb2_grpc.MonitorServiceStub:
        if self._stub is None:
            self._channel = self.transport.channel()
            self._stub = self.transport.stub(self._channel)
        return self._stub

    def _reset_channel(self) -> None:
        channel = self._channel
        self._channel = None
        self._stub = None
        if not self._session:
            # Without a writer session (an older server) re-open after a
            # reconnect to skip what the server stored; with one, keep it:
            # re-opening would look like a second writer.
            self._run_open = False
        if channel is not None:
            channel.close()

    def close_channel(self) -> None:
        """Close the channel (after the thread stopped)."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def interrupt(self) -> None:
        """Abort: cancel the call in flight."""
        self.abort.set()
        in_flight = self._in_flight
        if in_flight is not None:
            in_flight[1].set()

    def _call(self, method: str, request: Any) -> Any:
        """One unary call, cancelled when the client aborts; returns the reply or a CallFailure."""
        while True:
            try:
                return self._call_once(method, request)
            except _ForkCancelled:  # the server may have answered: resend
                if method == "OpenRun":
                    self._open_unanswered = True
                continue

    def _call_once(self, method: str, request: Any) -> Any:
        timeout = self.settings.rpc_timeout_s
        deadline = self.close_deadline
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise Aborted
        stub = self._ensure_stub()
        done = threading.Event()
        with self._gate:  # never start a call while a fork is in progress
            future = getattr(stub, method).future(
                request, timeout=timeout, metadata=self.transport.metadata
            )
            future.add_done_callback(lambda _f: done.set())
            self._in_flight = (future, done)
        if self.abort.is_set():
            done.set()
        done.wait()
        with self._gate:
            self._in_flight = None
            fork_cancelled, self._fork_cancelled = self._fork_cancelled, False
        if not future.done():
            future.cancel()
            raise Aborted
        if fork_cancelled and future.cancelled():
            raise _ForkCancelled
        try:
            return future.result()
        except grpc.RpcError as err:
            self._failed_method = method
            return CallFailure(err.code(), err.details() or "", retry_delay_s(err))

    # ------------------------------------------------------------ fork

    def before_fork(self) -> None:
        """Hold new calls; cancel the one in flight and wait (at most FORK_WAIT_S) for gRPC."""
        if self.forked:
            return
        deadline = time.monotonic() + FORK_WAIT_S
        self._gate_held = self._gate.acquire(timeout=FORK_WAIT_S)
        if not self._gate_held:  # pragma: no cover - the gate is only held to start a call
            return
        in_flight = self._in_flight
        if in_flight is None:
            return
        future, done = in_flight
        if not future.done():
            self._fork_cancelled = True
            future.cancel()
        done.wait(max(0.0, deadline - time.monotonic()))

    def after_fork_in_parent(self) -> None:
        """Let calls start again."""
        if self._gate_held:
            self._gate_held = False
            self._gate.release()

    def after_fork_in_child(self) -> None:
        """The child never uses the parent's channel or thread."""
        self.forked = True
        self._gate = threading.Lock()
        self._gate_held = False
        self._in_flight = None
        self._channel = None
        self._stub = None
