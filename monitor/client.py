"""The telemetry client: streams step records to the monitor server over gRPC.

:class:`MonitorClient` is usable from any training loop. ``log()`` builds the
record, puts it in a bounded buffer and returns (a few microseconds); a
daemon thread sends batches in the background. Nothing network-related ever
raises into the caller or blocks it: a dead or absent server costs one clear
warning, then quiet retries.

Delivery (``proto/v1/monitor.proto``): each record gets a per-(run, rank)
sequence number; the server stores each (run_id, rank, sequence) at most once
and acknowledges the highest contiguous sequence it holds, so the client
resends everything not acknowledged after any failure and delivery is
effectively exactly-once.

Policies, in one place:

* **Numbering.** The sender numbers records when it first sends them, after
  ``OpenRun`` told it the highest sequence the server holds for the rank.
  So records dropped for lack of space never leave gaps the server would wait
  for, and a new client with the same ``run_id`` and ``rank`` (a resumed job)
  continues after what the server already has instead of colliding with it.
  After the server lost a run (``NOT_FOUND``, e.g. a new database) the client
  re-opens it and renumbers what it still holds from the server's count.
* **Retry.** ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``,
  ``ABORTED``, ``INTERNAL``, ``UNKNOWN`` and ``CANCELLED`` are retried (a
  restarting server or a proxy shows all of them; resending is safe because
  the server de-duplicates), forever, with exponential backoff
  (``backoff_initial_s * 2**n``, at most ``backoff_max_s``, times a jitter of
  0.8-1.2) or exactly the delay of a ``google.rpc.RetryInfo`` the server sent.
  ``UNAVAILABLE`` also rebuilds the channel, and the run is re-opened after a
  reconnect to skip what the server already stored. ``NOT_FOUND`` re-opens
  the run and resends.
* **Stop.** Any other code (``UNAUTHENTICATED``, ``PERMISSION_DENIED``,
  ``INVALID_ARGUMENT``, ``UNIMPLEMENTED``, ...) means this client's
  configuration is wrong: it warns once with the code and the fix, sends
  nothing more, and keeps buffering: with ``spool_dir`` every record ends up
  on disk for a later replay, without it the oldest are dropped (counted).
* **Rejections.** Records the server rejects for good (``PushResponse.rejected``)
  are counted in ``DeliveryReport.rejected``, warned about once (field and
  reason) and never resent.
* **Memory.** At most ``max_buffer`` unacknowledged records are held in memory.
  Beyond that, with ``spool_dir``, records go to an append-only spool file
  (``<spool_dir>/<run_id>.rank<rank>.spool``, see :mod:`inversion_monitor.spool`;
  written every 64 KiB, fsynced once per ``flush_interval_s`` and on close)
  and are replayed in order; without it the oldest unsent records are dropped,
  with one warning and a counter.
* **Close.** ``close(timeout_s)`` sends what it can within ``timeout_s`` and
  then, with ``spool_dir``, writes everything still unacknowledged to the
  spool (fsynced). A later ``MonitorClient`` with the same ``run_id``, ``rank``
  and ``spool_dir`` replays it first (counted in ``DeliveryReport.replayed``).
  Without ``spool_dir`` what is left is reported as dropped. A ``with``
  block, and interpreter exit for clients still open, close with
  ``close_timeout_s``.
* **Fork.** A client is bound to the process that made it. In a forked child
  the inherited copy gets fresh locks and buffers, never touches the parent's
  channel, spool or thread, and drops what is logged to it (one warning):
  sending from the child under the parent's run and rank would collide with
  the parent's sequence numbers. Create a new client in the child (its own
  rank or run_id). gRPC itself is only partly fork-safe: forking while a
  channel is busy in another thread occasionally crashes the child inside
  gRPC's fork handlers, even a child that never uses gRPC and with or without
  this client (measured with grpcio 1.85: about 1 fork in 150 in a stress
  loop; none when the channel was idle, e.g. right after ``flush()``). So a
  fork made while this client has a call in flight waits for that call to
  finish (at most ``_FORK_WAIT_S`` = 2 s) and new calls wait for the fork. For
  children that never use gRPC (DataLoader workers), ``GRPC_ENABLE_FORK_SUPPORT=0``
  in the environment before Python starts avoided it (0 in 400); children
  that use gRPC are safest started with ``spawn`` or ``forkserver``.

>>> client = MonitorClient("127.0.0.1:9", "doc-run", run_id="doc1", close_timeout_s=0.1)
>>> client.log(1, {"spearman": -0.5, "pearson": -0.4, "n": 64,
...                "entropy_mean": 1.2, "score_mean": 3.4}, loss=2.0)
>>> report = client.close(timeout_s=0.1)  # nothing listens on port 9: dropped, no exception
>>> report.logged, report.delivered, report.dropped
(1, 0, 1)
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
from google.protobuf.message import DecodeError

from inversion_monitor._version import __version__
from inversion_monitor.config import RUN_KINDS
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.retry import CallFailure, backoff_s, classify, retry_delay_s
from inversion_monitor.rl_signals import RLStats, rl_stats_from_mapping
from inversion_monitor.spool import Spool
from inversion_monitor.stats import InversionStats
from inversion_monitor.wire import StatsMapping, step_record, validate_stats

logger = logging.getLogger(__name__)

RunStatus = Literal["completed", "failed", "interrupted"]

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_RETRY_DELAY_S = 300.0


class TelemetryWarning(RuntimeWarning):
    """Telemetry is degraded (server unreachable, records dropped or refused).

    Training is never interrupted; the warning says what happened and the fix.

    >>> issubclass(TelemetryWarning, RuntimeWarning)
    True
    """


@dataclass(frozen=True)
class DeliveryReport:
    """What became of the records a client handled.

    ``logged`` records were passed to ``log()``; ``replayed`` were found in the
    spool of an earlier client. Each of them was ``delivered`` (stored by the
    server), ``rejected`` (refused for good by the server), ``spooled`` (left
    on disk for a later client), ``dropped`` (lost: buffer full without a
    spool, or still unsent at close without a spool), or is still pending
    (only while the client is open).

    >>> r = DeliveryReport(logged=3, replayed=0, delivered=2, rejected=0, spooled=0, dropped=1)
    >>> r.pending, r.complete
    (0, False)
    """

    logged: int
    replayed: int
    delivered: int
    rejected: int
    spooled: int
    dropped: int

    @property
    def pending(self) -> int:
        """Records neither delivered, rejected, spooled nor dropped yet."""
        return (
            self.logged
            + self.replayed
            - self.delivered
            - self.rejected
            - self.spooled
            - self.dropped
        )

    @property
    def complete(self) -> bool:
        """True when the server answered for every record (stored or rejected)."""
        return self.delivered + self.rejected == self.logged + self.replayed


class _Entry:
    """A record in the send window: local index, record (or spooled bytes), wire sequence."""

    __slots__ = ("idx", "record", "seq")

    def __init__(self, idx: int, record: monitor_pb2.StepRecord | bytes) -> None:
        self.idx = idx
        self.record = record
        self.seq = 0  # 0: not numbered in the current epoch yet


class _Aborted(Exception):
    """The client is shutting down; the call was cancelled."""


def _normalise_endpoint(endpoint: str) -> str:
    target = endpoint.strip()
    if not target:
        raise ValueError("endpoint is empty: pass 'host:port' (e.g. '127.0.0.1:50051')")
    if target.startswith(("http://", "https://", "grpc://")):
        raise ValueError(
            f"endpoint={endpoint!r} looks like a URL: pass 'host:port' or 'dns:///host:port' "
            "(and tls=True for TLS)"
        )
    return target


_LIVE: weakref.WeakSet[MonitorClient] = weakref.WeakSet()
# Channels and spools inherited by a forked child: kept referenced so that
# their finalizers never run there (they belong to the parent).
_FORK_ORPHANS: list[object] = []
# how long a fork waits for an in-flight RPC to finish
_FORK_WAIT_S = 2.0


def _close_all_at_exit() -> None:
    status: RunStatus = "failed" if getattr(sys, "last_value", None) is not None else "completed"
    for client in list(_LIVE):
        try:
            client.close(timeout_s=client.close_timeout_s, status=status)
        except Exception:  # pragma: no cover - never fail interpreter exit
            logger.debug("closing a telemetry client at exit failed", exc_info=True)


atexit.register(_close_all_at_exit)


class MonitorClient:
    """Sends ``InversionStats`` of each step to an inversion-monitor server.

    Args:
        endpoint: the server's gRPC address, ``"host:port"`` or ``"dns:///host:port"``.
        run_name: human name of the run (the server derives a unique display name).
        project: optional project name.
        labels: free-form string labels of the run.
        run_id: globally unique id, 1-64 of ``[A-Za-z0-9_.-]``; default a new uuid4 hex.
            Reuse it (with ``spool_dir``) to resume a run or replay its spool.
        rank, world_size: this process's rank and the number of ranks.
        framework, model_type: e.g. ``"transformers"`` and ``"llama"``.
        kind: ``"sft"``, ``"rl"`` or ``"custom"`` (the server judges the run by
            it, e.g. falling entropy is expected in SFT); None: unknown.
        config: the monitor configuration (a JSON-serialisable mapping).
        token: bearer token sent as ``authorization: Bearer <token>``.
        tls: False for plaintext, True for TLS with the system roots, or the
            path of a PEM file of root certificates.
        spool_dir: folder for the spool file; None: drop the oldest records
            when the buffer is full.
        max_buffer: unacknowledged records held in memory (>= ``batch_size``).
        batch_size: records per ``Push``.
        flush_interval_s: the sender sends at least this often (and as soon as
            a batch is full).
        rpc_timeout_s: deadline of each call.
        backoff_initial_s, backoff_max_s: retry backoff bounds.
        close_timeout_s: timeout of the implicit ``close`` at the end of a ``with``
            block and at interpreter exit.

    Bad arguments raise ``ValueError``/``TypeError``; nothing else does.

    >>> stats = {"spearman": -0.5, "pearson": -0.4, "n": 64, "entropy_mean": 1.2, "score_mean": 3.4}
    >>> with MonitorClient("127.0.0.1:9", "doc", close_timeout_s=0.1) as client:
    ...     client.log(1, stats)
    ...     client.flush(timeout_s=0.05)  # no server: not acknowledged
    False
    >>> client.report().logged
    1
    """

    def __init__(
        self,
        endpoint: str,
        run_name: str,
        *,
        project: str = "",
        labels: Mapping[str, str] | None = None,
        run_id: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        framework: str = "custom",
        model_type: str = "",
        kind: str | None = None,
        config: Mapping[str, Any] | None = None,
        token: str | None = None,
        tls: bool | str | os.PathLike[str] = False,
        spool_dir: str | os.PathLike[str] | None = None,
        max_buffer: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        rpc_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.endpoint = _normalise_endpoint(endpoint)
        self.run_id = uuid.uuid4().hex if run_id is None else run_id
        if not _RUN_ID.match(self.run_id):
            raise ValueError(
                f"run_id={self.run_id!r} is invalid: use 1-64 characters of [A-Za-z0-9_.-] "
                "(or leave it None for a new uuid4 hex)"
            )
        if kind is not None and kind not in RUN_KINDS:
            raise ValueError(
                f"kind={kind!r} is invalid: pass one of {', '.join(map(repr, RUN_KINDS))} or None"
            )
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_buffer < batch_size:
            raise ValueError(f"max_buffer={max_buffer} must be >= batch_size={batch_size}")
        for name, value in (
            ("flush_interval_s", flush_interval_s),
            ("rpc_timeout_s", rpc_timeout_s),
            ("backoff_initial_s", backoff_initial_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a positive number of seconds")
        if close_timeout_s < 0:
            raise ValueError(f"close_timeout_s={close_timeout_s} must be >= 0")
        labels = dict(labels or {})
        for key, label in labels.items():
            if not isinstance(key, str) or not isinstance(label, str):
                raise TypeError(f"labels[{key!r}]={label!r}: labels map strings to strings")
        try:
            config_json = json.dumps(dict(config or {}), sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"config is not JSON-serialisable ({exc}): pass plain values"
            ) from None

        self.rank = rank
        self.close_timeout_s = close_timeout_s
        self._run_info = monitor_pb2.RunInfo(
            run_id=self.run_id,
            name=run_name,
            project=project,
            labels=labels,
            framework=framework,
            model_type=model_type,
            world_size=world_size,
            config_json=config_json,
            client_version=__version__,
            kind=kind or "",
        )
        self._credentials = self._channel_credentials(tls)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._max_buffer = max_buffer
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._rpc_timeout_s = rpc_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s

        self._spool: Spool | None = None
        replayed = 0
        if spool_dir is not None:
            self._spool = Spool(Path(spool_dir) / f"{self.run_id}.rank{rank}.spool")
            replayed = len(self._spool)
        self._init_state()
        self._replayed = replayed
        self._next_idx = replayed + 1
        self._spool_first_idx = 1
        if replayed:
            logger.info(
                "replaying %d records of run %s rank %d from %s",
                replayed,
                self.run_id,
                rank,
                self._spool.path if self._spool else "",
            )

        self._pid = os.getpid()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._worker, name=f"inversion-monitor-sender-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()
        _LIVE.add(self)
        weak_reinit = weakref.WeakMethod(self._at_fork_reinit)
        weak_before = weakref.WeakMethod(self._before_fork)
        weak_parent = weakref.WeakMethod(self._after_fork_in_parent)
        os.register_at_fork(
            before=lambda: _call_weak(weak_before),
            after_in_parent=lambda: _call_weak(weak_parent),
            after_in_child=lambda: _call_weak(weak_reinit),
        )

    @staticmethod
    def _channel_credentials(
        tls: bool | str | os.PathLike[str],
    ) -> grpc.ChannelCredentials | None:
        if tls is False:
            return None
        if tls is True:
            return grpc.ssl_channel_credentials()
        path = Path(tls)
        try:
            roots = path.read_bytes()
        except OSError as exc:
            raise ValueError(
                f"tls={str(tls)!r}: cannot read the root certificates ({exc}); pass the path "
                "of a PEM file, True for the system roots, or False"
            ) from None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def _init_state(self) -> None:
        """Locks, events, buffers and counters (also the fresh state of a fork child)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # held for the duration of each RPC; a fork waits (bounded) until no call is in
        # flight, since forking while gRPC is mid-call can crash the child
        self._fork_gate = threading.Lock()
        self._fork_gate_held = False
        self._close_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing_evt = threading.Event()
        self._abort = threading.Event()
        self._call_done: threading.Event | None = None
        self._queue: deque[tuple[int, monitor_pb2.StepRecord | bytes]] = deque()
        self._window: deque[_Entry] = deque()
        self._channel: grpc.Channel | None = None
        self._stub: monitor_pb2_grpc.MonitorServiceStub | None = None
        self._run_open = False
        self._display_name: str | None = None
        self._acked = 0  # highest contiguous sequence the server holds
        self._next_seq = 1
        self._logged = 0
        self._replayed = 0
        self._delivered = 0
        self._rejected = 0
        self._dropped = 0
        self._spooled_at_close = 0
        self._first_dropped_idx = 0
        self._next_idx = 1
        self._spool_first_idx = 1
        self._closed = False
        self._close_deadline: float | None = None
        self._close_status: RunStatus = "completed"
        self._report: DeliveryReport | None = None
        self._halted: str | None = None
        self._forked = False
        self._warned: set[str] = set()
        self._outage = False
        self._attempt = 0
        self._not_found_in_a_row = 0

    # ------------------------------------------------------------ public API

    @property
    def display_name(self) -> str | None:
        """The run's name on the server (None until the run was opened)."""
        return self._display_name

    def log(
        self,
        step: int,
        stats: InversionStats | Mapping[str, Any],
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
        entropy_covariance: float | None = None,
        components: Iterable[Mapping[str, Any]] | None = None,
        samples: Iterable[tuple[float, float, int]] | None = None,
        probe_seconds: float | None = None,
        wall_time: float | None = None,
        rl: RLStats | None = None,
    ) -> None:
        """Queue the record of one step and return at once.

        ``stats`` is an ``InversionStats`` or a mapping with at least
        ``spearman``, ``pearson``, ``n``, ``entropy_mean`` and ``score_mean``
        (see :class:`~inversion_monitor.wire.StatsMapping`); a bad one raises
        ``ValueError`` naming the field. ``components`` and ``samples`` are as
        in :func:`~inversion_monitor.wire.step_record`. ``wall_time`` defaults
        to now. RL signals come as the stats keys ``reward_mean``,
        ``reward_std``, ``policy_entropy_mean`` and ``entropy_covariance``, or
        whole as ``rl`` (an :class:`~inversion_monitor.rl_signals.RLStats`,
        with quantiles and advantages; not both). Never raises for network
        reasons and never blocks on the network.
        """
        checked: InversionStats | StatsMapping
        if isinstance(stats, InversionStats):
            checked = stats
        elif isinstance(stats, Mapping):
            checked = validate_stats(stats)
            from_keys = rl_stats_from_mapping(stats)
            if from_keys is not None:
                if rl is not None:
                    raise ValueError(
                        "RL signals given twice: as stats keys (reward_mean, ...) and as rl=; "
                        "pass one of them"
                    )
                if entropy_covariance is not None and "entropy_covariance" in stats:
                    raise ValueError(
                        "entropy_covariance given twice: as a stats key and as an argument; "
                        "pass one of them"
                    )
                rl = from_keys
        else:
            raise TypeError(
                f"stats must be an InversionStats or a mapping, got {type(stats).__name__}"
            )
        record = step_record(
            run_id=self.run_id,
            rank=self.rank,
            step=step,
            wall_time=time.time() if wall_time is None else float(wall_time),
            stats=checked,
            loss=loss,
            learning_rate=learning_rate,
            entropy_covariance=entropy_covariance,
            components=components,
            samples=samples,
            probe_seconds=probe_seconds,
            rl=rl,
        )
        warn: str | None = None
        with self._lock:
            if self._closed or self._forked:
                self._dropped += 1
                warn = "after_close"
            else:
                idx = self._next_idx
                self._next_idx = idx + 1
                self._logged += 1
                spool = self._spool
                full = len(self._queue) + len(self._window) >= self._max_buffer
                if spool is not None and (full or len(spool)):
                    if not len(spool):
                        self._spool_first_idx = idx
                    spool.append(record.SerializeToString())
                    ready = len(spool) >= self._batch_size
                else:
                    if full:
                        self._dropped += 1
                        if self._queue:
                            dropped_idx = self._queue.popleft()[0]
                            self._queue.append((idx, record))
                        else:  # everything held is in flight: drop the new record
                            dropped_idx = idx
                        if not self._first_dropped_idx:
                            self._first_dropped_idx = dropped_idx
                        warn = "overflow"
                    else:
                        self._queue.append((idx, record))
                    ready = len(self._queue) >= self._batch_size
        if warn is None:
            if ready and not self._wake.is_set():
                self._wake.set()
        elif warn == "overflow":
            self._warn_once(
                "overflow",
                f"telemetry buffer full ({self._max_buffer} unacknowledged records) and no "
                "spool_dir: dropping the oldest unsent records (counted in "
                "DeliveryReport.dropped). Pass spool_dir=... to keep them on disk, or raise "
                "max_buffer.",
            )
        else:
            self._warn_once(
                "after_close",
                "MonitorClient.log() called on a closed client or in a forked child: the "
                "record is dropped. Create a new MonitorClient (in a child: with its own "
                "rank or run_id).",
            )

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send now and wait until every record logged so far is acknowledged.

        Returns True when the server answered for all of them (stored or
        rejected for good) within ``timeout_s``; False on timeout, when some
        were dropped, or when the client stopped sending (see the module
        docstring). Never raises.
        """
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            target = self._next_idx
        self._wake.set()
        resolved = self._wait_resolved(target, deadline)
        with self._lock:
            lost = 0 < self._first_dropped_idx < target
        return resolved and not lost

    def report(self) -> DeliveryReport:
        """The counts so far (the final ones once closed)."""
        if self._report is not None:
            return self._report
        with self._lock:
            return self._snapshot()

    def close(self, timeout_s: float = 10.0, *, status: RunStatus = "completed") -> DeliveryReport:
        """Deliver what is left within ``timeout_s``, then stop; idempotent.

        What is still unacknowledged at the deadline is written to the spool
        (with ``spool_dir``) or counted as dropped. When everything was
        delivered the run's rank is closed on the server with ``status``.
        Returns the final :class:`DeliveryReport`. Never raises.
        """
        with self._close_lock:
            if self._report is not None:
                return self._report
            deadline = time.monotonic() + max(timeout_s, 0.0)
            with self._lock:
                self._closed = True
                self._close_status = status
                self._close_deadline = deadline
                self._cond.notify_all()
            self._closing_evt.set()
            self._wake.set()
            thread = self._thread
            if thread is not None and thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0.0))
                if thread.is_alive():
                    self._interrupt()
                    thread.join(5.0)
            self._abort.set()
            self._report = self._finish()
            _LIVE.discard(self)
            return self._report

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        status: RunStatus = "completed"
        if exc_type is not None:
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        self.close(timeout_s=self.close_timeout_s, status=status)

    # ------------------------------------------------------------ bookkeeping

    def _snapshot(self) -> DeliveryReport:
        spooled = self._spooled_at_close
        return DeliveryReport(
            logged=self._logged,
            replayed=self._replayed,
            delivered=self._delivered,
            rejected=self._rejected,
            spooled=spooled,
            dropped=self._dropped,
        )

    def _min_unresolved(self) -> int:
        """Local index of the oldest record not yet answered for (lock held)."""
        if self._window:
            return self._window[0].idx
        if self._queue:
            return self._queue[0][0]
        if self._spool is not None and len(self._spool):
            return self._spool_first_idx
        return self._next_idx

    def _wait_resolved(self, target: int, deadline: float) -> bool:
        with self._cond:
            while self._min_unresolved() < target:
                if self._halted is not None or self._report is not None or self._forked:
                    return False
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def _finish(self) -> DeliveryReport:
        """After the sender stopped: spool or drop what is left; close resources."""
        with self._lock:
            leftovers: list[bytes] = []
            for entry in self._window:
                record = entry.record
                if isinstance(record, bytes):
                    leftovers.append(record)
                else:
                    record.sequence = entry.seq
                    leftovers.append(record.SerializeToString())
            for _, payload in self._queue:
                leftovers.append(
                    payload if isinstance(payload, bytes) else payload.SerializeToString()
                )
            self._window.clear()
            self._queue.clear()
            spool = self._spool
            if spool is not None and not self._forked:
                try:
                    spool.replace_all(leftovers)
                    self._spooled_at_close = len(spool)
                    spool.close()
                except OSError as exc:
                    self._dropped += len(leftovers) + len(spool)
                    logger.warning("could not write the telemetry spool %s: %s", spool.path, exc)
            else:
                self._dropped += len(leftovers)
            report = self._snapshot()
            self._cond.notify_all()
        if self._channel is not None and not self._forked:
            self._channel.close()
        self._channel = None
        self._stub = None
        if report.spooled:
            self._warn_once(
                "spooled",
                f"{report.spooled} telemetry records of run {self.run_id} rank {self.rank} were "
                f"not delivered and are kept in {self._spool.path if self._spool else ''}; a "
                "MonitorClient with the same run_id, rank and spool_dir sends them.",
            )
        elif report.dropped and not self._forked:
            logger.warning(
                "telemetry of run %s rank %d: %d of %d records were dropped (%s)",
                self.run_id,
                self.rank,
                report.dropped,
                report.logged + report.replayed,
                report,
            )
        return report

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            logger.debug(message)
            return
        self._warned.add(key)
        logger.warning(message)
        warnings.warn(message, TelemetryWarning, stacklevel=3)

    # ------------------------------------------------------------ fork

    def _before_fork(self) -> None:
        """Let an in-flight RPC finish (at most ``_FORK_WAIT_S``) and hold new ones."""
        if not self._forked:
            self._fork_gate_held = self._fork_gate.acquire(timeout=_FORK_WAIT_S)

    def _after_fork_in_parent(self) -> None:
        if self._fork_gate_held:
            self._fork_gate_held = False
            self._fork_gate.release()

    def _at_fork_reinit(self) -> None:
        """In a forked child: fresh state; never touch the parent's channel, spool, thread."""
        if self._channel is not None:
            _FORK_ORPHANS.append(self._channel)
        if self._spool is not None:
            self._spool.forget()
            _FORK_ORPHANS.append(self._spool)
        run_id, rank = self.run_id, self.rank
        self._init_state()
        self._spool = None
        self._thread = None
        self._forked = True
        self._report = None
        logger.debug(
            "forked child %d: client of run %s rank %d is inert", os.getpid(), run_id, rank
        )

    # ------------------------------------------------------------ sender thread

    def _worker(self) -> None:
        try:
            self._run_sender()
        except _Aborted:
            pass
        except Exception:  # pragma: no cover - a bug must not pass silently
            logger.exception("telemetry sender thread failed; records are no longer sent")
            with self._lock:
                self._halted = "internal error"
        finally:
            with self._lock:
                self._cond.notify_all()

    def _run_sender(self) -> None:
        last_sync = time.monotonic()
        while not self._abort.is_set():
            now = time.monotonic()
            if now - last_sync >= self._flush_interval_s:
                self._sync_spool()
                last_sync = now
            if self._halted is None:
                failure = self._drain()
                if failure is not None:
                    delay = self._handle_failure(failure)
                    if delay is not None and not self._sleep(delay):
                        return  # closing: the retry would come after close's deadline
                    continue
            if self._closing_evt.is_set():
                if self._halted is None:
                    self._close_run()
                return
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()

    def _sleep(self, delay: float) -> bool:
        """Back off for ``delay`` seconds; False when closing makes retrying pointless."""
        until = time.monotonic() + delay
        while True:
            if self._abort.is_set():
                return False
            deadline = self._close_deadline
            if deadline is not None and until > deadline:
                return False
            remaining = until - time.monotonic()
            if remaining <= 0:
                return True
            event = self._abort if self._closing_evt.is_set() else self._closing_evt
            if not event.wait(min(remaining, self._flush_interval_s)):
                self._sync_spool()  # long outages still fsync the spool each interval

    def _sync_spool(self) -> None:
        with self._lock:
            if self._spool is not None:
                try:
                    self._spool.sync()
                except OSError as exc:
                    self._warn_once("spool_io", f"cannot write the telemetry spool: {exc}")

    def _drain(self) -> CallFailure | None:
        """Open the run if needed and push until nothing is pending; a failure stops it."""
        while not self._abort.is_set():
            if not self._run_open:
                failure = self._open_run()
                if failure is not None:
                    return failure
            batch = self._next_batch()
            if not batch:
                return None
            result = self._call("Push", monitor_pb2.PushRequest(records=batch))
            if isinstance(result, CallFailure):
                return result
            assert isinstance(result, monitor_pb2.PushResponse)
            if not self._on_push_response(result, batch[0].sequence):
                return CallFailure(grpc.StatusCode.ABORTED, "the server acknowledged nothing", None)
            self._on_success()
        return None

    def _open_run(self) -> CallFailure | None:
        request = monitor_pb2.OpenRunRequest(run=self._run_info, rank=self.rank)
        result = self._call("OpenRun", request)
        if isinstance(result, CallFailure):
            return result
        assert isinstance(result, monitor_pb2.OpenRunResponse)
        acked = result.acked_sequence
        with self._lock:
            self._display_name = result.display_name or self._display_name
            # Skip what the server already has; renumber the rest from its count.
            while self._window and 0 < self._window[0].seq <= acked:
                self._window.popleft()
                self._delivered += 1
            for i, entry in enumerate(self._window):
                entry.seq = acked + 1 + i
            self._acked = acked
            self._next_seq = acked + 1 + len(self._window)
            self._run_open = True
            self._cond.notify_all()
        self._not_found_in_a_row = 0
        logger.debug("opened run %s rank %d (server holds %d)", self.run_id, self.rank, acked)
        return None

    def _next_batch(self) -> list[monitor_pb2.StepRecord]:
        """Top the window up from memory (and the spool) and number it."""
        with self._lock:
            spool = self._spool
            if spool is not None:
                room = self._max_buffer - len(self._queue) - len(self._window)
                if len(spool) and room > 0:
                    for data in spool.read(min(room, self._batch_size)):
                        self._queue.append((self._spool_first_idx, data))
                        self._spool_first_idx += 1
            while len(self._window) < self._batch_size and self._queue:
                idx, payload = self._queue.popleft()
                self._window.append(_Entry(idx, payload))
            entries = list(self._window)
        # Parse and number outside the lock; only this thread touches entries.
        corrupt: list[_Entry] = []
        already: list[_Entry] = []
        for entry in entries:
            if entry.seq:
                continue
            record = entry.record
            if isinstance(record, bytes):
                try:
                    record = monitor_pb2.StepRecord.FromString(record)
                except DecodeError:
                    corrupt.append(entry)
                    continue
                entry.record = record
                if 0 < record.sequence <= self._acked:
                    already.append(entry)  # sent by an earlier client; the server has it
                    continue
            entry.seq = self._next_seq
            self._next_seq += 1
        if corrupt or already:
            with self._lock:
                for entry in corrupt:
                    self._window.remove(entry)
                    self._dropped += 1
                    if not self._first_dropped_idx:
                        self._first_dropped_idx = entry.idx
                for entry in already:
                    self._window.remove(entry)
                    self._delivered += 1
                entries = list(self._window)
                self._cond.notify_all()
            if corrupt:
                self._warn_once("corrupt", f"{len(corrupt)} unreadable spool entries dropped")
        batch = []
        for entry in entries:
            record = entry.record
            assert isinstance(record, monitor_pb2.StepRecord)
            record.sequence = entry.seq
            batch.append(record)
        return batch

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
        first_reject: monitor_pb2.RejectedRecord | None = None
        resolved = 0
        with self._lock:
            while self._window and self._window[0].seq <= acked:
                entry = self._window.popleft()
                resolved += 1
                if entry.seq in rejected:
                    self._rejected += 1
                    first_reject = first_reject or rejected[entry.seq]
                else:
                    self._delivered += 1
            self._acked = max(self._acked, acked)
            self._cond.notify_all()
        if first_reject is not None:
            self._warn_once(
                "rejected",
                f"the monitor server rejected records for good (e.g. sequence "
                f"{first_reject.sequence}: {first_reject.field}: {first_reject.reason}); they "
                "are counted in DeliveryReport.rejected and not resent.",
            )
        if acked < first_seq - 1:
            # The server holds less than it acknowledged before (it lost data):
            # re-open, which renumbers from its count.
            self._run_open = False
        return resolved > 0

    def _on_success(self) -> None:
        self._attempt = 0
        self._not_found_in_a_row = 0
        if self._outage:
            self._outage = False
            logger.info("monitor server at %s reachable again", self.endpoint)

    def _handle_failure(self, failure: CallFailure) -> float | None:
        """The delay before the next attempt, or None when this client stops sending."""
        code = failure.code
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
        if code == grpc.StatusCode.UNAVAILABLE:
            self._reset_channel()
        delay = failure.retry_delay_s
        if delay is None:
            delay = backoff_s(
                self._attempt, initial_s=self._backoff_initial_s, max_s=self._backoff_max_s
            )
            self._attempt += 1
        if not self._outage:
            self._outage = True
            message = (
                f"cannot deliver telemetry to the monitor server at {self.endpoint} "
                f"({code.name}: {failure.details}); records are buffered "
                f"(max_buffer={self._max_buffer}, "
                f"spool_dir={'set' if self._spool is not None else 'none'}) and retried in "
                "the background; training continues."
            )
            if "unreachable" in self._warned:
                logger.warning(message)
            else:
                self._warn_once("unreachable", message)
        else:
            logger.debug("telemetry retry in %.2fs after %s", delay, code.name)
        return delay

    def _halt(self, failure: CallFailure) -> None:
        fixes = {
            grpc.StatusCode.UNAUTHENTICATED: "check the token",
            grpc.StatusCode.PERMISSION_DENIED: "check the token's permissions",
            grpc.StatusCode.INVALID_ARGUMENT: "check the run settings (run_id, rank, labels)",
            grpc.StatusCode.UNIMPLEMENTED: "check that the endpoint is an inversion-monitor server",
        }
        fix = fixes.get(failure.code, "check the client configuration and the server logs")
        keep = (
            "records are spooled for a later replay with the same run_id and spool_dir"
            if self._spool is not None
            else f"up to max_buffer={self._max_buffer} records are kept, older ones dropped"
        )
        with self._lock:
            self._halted = failure.code.name
            self._cond.notify_all()
        self._warn_once(
            "halted",
            f"the monitor server at {self.endpoint} refused run {self.run_id} "
            f"({failure.code.name}: {failure.details}): {fix}. This client sends nothing "
            f"more; {keep}. Training continues.",
        )

    def _close_run(self) -> None:
        with self._lock:
            done = self._run_open and self._min_unresolved() >= self._next_idx
        if not done:
            return
        request = monitor_pb2.CloseRunRequest(
            run_id=self.run_id, rank=self.rank, status=self._close_status
        )
        result = self._call("CloseRun", request)
        if isinstance(result, CallFailure):
            logger.debug("CloseRun failed: %s %s", result.code.name, result.details)

    # ------------------------------------------------------------ transport

    def _ensure_stub(self) -> monitor_pb2_grpc.MonitorServiceStub:
        if self._stub is None:
            options = [("grpc.enable_retries", 0)]
            if self._credentials is None:
                self._channel = grpc.insecure_channel(self.endpoint, options=options)
            else:
                self._channel = grpc.secure_channel(
                    self.endpoint, self._credentials, options=options
                )
            self._stub = monitor_pb2_grpc.MonitorServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def _reset_channel(self) -> None:
        channel = self._channel
        self._channel = None
        self._stub = None
        self._run_open = False
        if channel is not None:
            channel.close()

    def _interrupt(self) -> None:
        self._abort.set()
        done = self._call_done
        if done is not None:
            done.set()

    def _call(self, method: str, request: Any) -> Any:
        """One unary call, cancelled when the client aborts; returns the reply or a CallFailure."""
        timeout = self._rpc_timeout_s
        deadline = self._close_deadline
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise _Aborted
        stub = self._ensure_stub()
        with self._fork_gate:
            done = threading.Event()
            self._call_done = done
            future = getattr(stub, method).future(request, timeout=timeout, metadata=self._metadata)
            future.add_done_callback(lambda _f: done.set())
            if self._abort.is_set():
                done.set()
            done.wait()
            self._call_done = None
            if not future.done():
                future.cancel()
                raise _Aborted
            try:
                return future.result()
            except grpc.RpcError as err:
                return CallFailure(err.code(), err.details() or "", retry_delay_s(err))


def _call_weak(weak: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = weak()
    if method is not None:
        method()
