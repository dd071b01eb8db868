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
  ``UNAVAILABLE`` also rebuilds the channel (an older server without writer
  sessions re-opens the run then). ``NOT_FOUND`` re-opens the run and resends.
* **Failover.** With several endpoints (``"host1:50051,host2:50051"``,
  replicas of one store) ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` move the
  client to the next endpoint, round-robin: at once while one has not failed
  since the last success, after the backoff above once all have. It keeps its
  records, spool and writer session, re-opens the run where the new endpoint
  asks for it (``NOT_FOUND``, ``FAILED_PRECONDITION``; ``ALREADY_EXISTS``
  takes over its own stream once) and resends everything not acknowledged;
  the store's sequence de-duplication drops what had arrived (see
  :mod:`inversion_monitor.telemetry.endpoints`).
* **Stop.** Any other code (``UNAUTHENTICATED``, ``PERMISSION_DENIED``,
  ``INVALID_ARGUMENT``, ``UNIMPLEMENTED``, ...) means this client's
  configuration is wrong: it warns once with the code and the fix, sends
  nothing more, and keeps buffering: with ``spool_dir`` every record ends up
  on disk for a later replay, without it the oldest are dropped (counted).
* **Rejections.** Records the server rejects for good (``PushResponse.rejected``)
  are counted in ``DeliveryReport.rejected``, warned about once (field and
  reason) and never resent.
* **Writer sessions.** ``OpenRun`` grants a session for the (run, rank)
  stream, carried by every ``Push`` and ``CloseRun``. A second live client on
  the same run and rank is refused (``ALREADY_EXISTS``); a client resuming a
  non-empty spool takes the stream over explicitly (``takeover``), and so does,
  once, a client whose OpenRun may have been granted with the answer lost; a client
  whose stream was taken over (``FAILED_PRECONDITION`` again after one
  re-open) stops. A stopped client never counts records as delivered: they
  stay in the spool (or are dropped at close without one) and
  ``DeliveryReport.stopped`` names the reason (see :mod:`inversion_monitor.telemetry.sender`).
* **Memory and disk.** At most ``max_buffer`` unacknowledged records are held
  in memory. With ``spool_dir`` every record is also written to the spool file
  ``<spool_dir>/<run_id>.rank<rank>.spool`` before ``log()`` returns
  (write-ahead, see :mod:`inversion_monitor.telemetry.spool`; fsynced once per
  ``flush_interval_s`` and on close) and stays there until acknowledged, so a
  killed process loses nothing; records beyond ``max_buffer`` live only on
  disk and are replayed in order. A disk that refuses a write (full, I/O
  error) never raises into ``log()``: one warning, the record is kept in
  memory when there is room, and ``DeliveryReport.spool_errors`` counts it.
  Without a spool the oldest unsent records are dropped, with one warning and
  a counter.
* **Close.** ``close(timeout_s)`` sends what it can within ``timeout_s``;
  with ``spool_dir`` everything still unacknowledged stays in the spool
  (fsynced). A later ``MonitorClient`` with the same ``run_id``, ``rank``
  and ``spool_dir`` replays it first (counted in ``DeliveryReport.replayed``).
  Without ``spool_dir`` what is left is reported as dropped. A ``with``
  block, and interpreter exit for clients still open, close with
  ``close_timeout_s``.
* **Fork.** A client is bound to the process that made it. In a forked child
  the inherited copy gets fresh locks and buffers, never touches the parent's
  channel, spool or thread, and drops what is logged to it (one warning):
  sending from the child under the parent's run and rank would collide with
  the parent's sequence numbers. Create a new client in the child (its own
  rank or run_id). gRPC can crash a child forked while a call is in flight,
  so a fork cancels this client's call in flight, waits (at most 100 ms)
  until gRPC finished it and resends it afterwards (see
  :mod:`inversion_monitor.telemetry.sender` and ``benchmarks/bench_client_fork.py``).
  Children that use gRPC are safest started with ``spawn`` or ``forkserver``.

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
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from inversion_monitor._version import __version__
from inversion_monitor.config import default, validate_delivery
from inversion_monitor.metrics.stats import InversionStats
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import RUN_KINDS
from inversion_monitor.rl.signals import RL_STATS_KEYS, RLStats
from inversion_monitor.telemetry.endpoints import Rotation, parse_endpoints
from inversion_monitor.telemetry.sender import (
    RunStatus,
    Sender,
    SenderSettings,
    TelemetryWarning,
    Warner,
)
from inversion_monitor.telemetry.spool import Spool, SpoolBusy
from inversion_monitor.telemetry.transport import TlsSetting, Transport
from inversion_monitor.telemetry.window import DeliveryReport, SendWindow
from inversion_monitor.telemetry.wire import (
    StatsMapping,
    health_values,
    split_stats,
    step_record,
)

__all__ = ["DeliveryReport", "MonitorClient", "RunStatus", "TelemetryWarning"]

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


_LIVE: weakref.WeakSet[MonitorClient] = weakref.WeakSet()
# Channels and spools inherited by a forked child: kept referenced so that
# their finalizers never run there (they belong to the parent).
_FORK_ORPHANS: list[object] = []


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
        endpoint: the server's gRPC address, ``"host:port"`` or ``"dns:///host:port"``;
            several replicas of one store as ``"host1:port1,host2:port2"`` (or a
            sequence of them): the client fails over between them.
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
        spool_dir: folder for the write-ahead spool file; None: records live
            in memory only and the oldest are dropped when the buffer is full.
        max_buffer: unacknowledged records held in memory (>= ``batch_size``).
        batch_size: records per ``Push``.
        flush_interval_s: the sender sends (and fsyncs the spool) at least this often.
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
        endpoint: str | Sequence[str],
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
        tls: TlsSetting = False,
        spool_dir: str | os.PathLike[str] | None = None,
        max_buffer: int = default("max_buffer"),
        batch_size: int = default("batch_size"),
        flush_interval_s: float = default("flush_interval_s"),
        rpc_timeout_s: float = default("rpc_timeout_s"),
        backoff_initial_s: float = default("backoff_initial_s"),
        backoff_max_s: float = default("backoff_max_s"),
        close_timeout_s: float = default("close_timeout_s"),
    ) -> None:
        endpoints = Rotation(
            [Transport.create(e, tls=tls, token=token) for e in parse_endpoints(endpoint)]
        )
        self.endpoints: tuple[str, ...] = tuple(t.endpoint for t in endpoints.items)
        self.endpoint = ",".join(self.endpoints)
        self.run_id = uuid.uuid4().hex if run_id is None else run_id
        if not _RUN_ID.fullmatch(self.run_id):
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
        delivery = validate_delivery(  # MonitorConfig owns every bound
            max_buffer=max_buffer,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            rpc_timeout_s=rpc_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            close_timeout_s=close_timeout_s,
        )
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
        self.close_timeout_s: float = delivery["close_timeout_s"]
        run_info = monitor_pb2.RunInfo(
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
        self._warner = Warner()
        spool = self._open_spool(spool_dir)
        self._window = SendWindow(
            max_buffer=delivery["max_buffer"], batch_size=delivery["batch_size"], spool=spool
        )
        if self._window.replayed:
            logger.info(
                "replaying %d records of run %s rank %d from %s",
                self._window.replayed,
                self.run_id,
                rank,
                spool.path if spool is not None else "",
            )
        self._sender = Sender(
            endpoints,
            self._window,
            run_info,
            rank=rank,
            settings=SenderSettings(
                flush_interval_s=delivery["flush_interval_s"],
                rpc_timeout_s=delivery["rpc_timeout_s"],
                backoff_initial_s=delivery["backoff_initial_s"],
                backoff_max_s=delivery["backoff_max_s"],
            ),
            warner=self._warner,
            takeover=self._window.replayed > 0,
        )
        self._close_lock = threading.Lock()
        self._report: DeliveryReport | None = None
        self._forked = False
        self._thread: threading.Thread | None = threading.Thread(
            target=self._sender.run,
            name=f"inversion-monitor-sender-{self.run_id[:8]}",
            daemon=True,
        )
        self._thread.start()
        _LIVE.add(self)
        weak_before = weakref.WeakMethod(self._before_fork)
        weak_parent = weakref.WeakMethod(self._after_fork_in_parent)
        weak_child = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(
            before=lambda: _call_weak(weak_before),
            after_in_parent=lambda: _call_weak(weak_parent),
            after_in_child=lambda: _call_weak(weak_child),
        )

    def _open_spool(self, spool_dir: str | os.PathLike[str] | None) -> Spool | None:
        """The spool of this run and rank; None (one warning) when the disk refuses it."""
        if spool_dir is None:
            return None
        path = Path(spool_dir) / f"{self.run_id}.rank{self.rank}.spool"
        try:
            return Spool(path)
        except SpoolBusy as exc:
            reason = f"{exc}"
        except OSError as exc:
            reason = f"cannot open {path} ({exc})"
        self._warner.once(
            "spool_open",
            f"no telemetry spool: {reason}; this client keeps records in memory only "
            f"(counted in DeliveryReport.dropped when the buffer overflows). Training continues.",
        )
        return None

    # ------------------------------------------------------------ public API

    @property
    def display_name(self) -> str | None:
        """The run's name on the server (None until the run was opened)."""
        return self._sender.display_name

    @property
    def current_endpoint(self) -> str:
        """The endpoint the client sends to now (it moves on failover)."""
        return self._sender.transport.endpoint

    @property
    def failovers(self) -> int:
        """How often the client moved to another endpoint so far."""
        return self._sender.endpoints.failovers

    @property
    def warnings(self) -> tuple[str, ...]:
        """The ``TelemetryWarning`` messages this client issued so far, oldest first.

        Each is also a Python warning, which the process's warning filters may
        hide or show once per process; this is the client's own record.
        """
        return tuple(self._warner.messages)

    def log(
        self,
        step: int,
        stats: InversionStats | Mapping[str, Any] | None,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
        entropy_covariance: float | None = None,
        components: Iterable[Mapping[str, Any]] | None = None,
        samples: Iterable[tuple[float, float, int]] | None = None,
        probe_seconds: float | None = None,
        wall_time: float | None = None,
        rl: RLStats | None = None,
        health: Mapping[str, float | None] | None = None,
        probe_precision: str | None = None,
    ) -> None:
        """Queue the record of one step and return at once.

        ``stats`` is an ``InversionStats``, None, or a mapping. A mapping holds
        any subset of the health keys (``loss``, ``grad_norm``,
        ``learning_rate``, ``reward_mean``, ``reward_std``,
        ``policy_entropy_mean``, ``entropy_covariance``, ``kl``,
        ``clip_ratio``, ``completion_length_mean``: see
        :data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`) and, on
        steps the probe ran, the inversion statistics: at least ``spearman``,
        ``pearson``, ``n``, ``entropy_mean`` and ``score_mean`` (see
        :class:`~inversion_monitor.telemetry.wire.StatsMapping`). A bad one
        raises ``ValueError`` naming the field. ``health`` gives health
        values beside an ``InversionStats``. Non-finite health values are
        sent as themselves and named in ``nonfinite_fields``. ``components``
        and ``samples`` are as in :func:`~inversion_monitor.telemetry.wire.step_record`.
        ``wall_time`` defaults to now. ``rl`` (an
        :class:`~inversion_monitor.rl.signals.RLStats`) adds quantiles and
        advantages; the RL keys then cannot also be stats keys. With
        ``spool_dir`` the record is in the spool file when this returns. Never
        raises for network or disk reasons and never blocks on the network.

        >>> with MonitorClient("127.0.0.1:9", "doc", close_timeout_s=0.1) as client:
        ...     client.log(5, {"loss": float("nan"), "grad_norm": 12.5})  # health only
        >>> client.report().logged
        1
        """
        checked: InversionStats | StatsMapping | None
        values = health_values(health, strict=True) if health else {}
        if stats is None or isinstance(stats, InversionStats):
            checked = stats
        elif isinstance(stats, Mapping):
            checked, from_keys = split_stats(stats)
            for name in from_keys:
                if name in values or _given(name, loss, learning_rate, entropy_covariance):
                    raise ValueError(
                        f"{name} given twice: as a stats key and as an argument; pass one of them"
                    )
                if rl is not None and name in RL_STATS_KEYS:
                    raise ValueError(
                        f"RL signals given twice: as stats keys ({name}, ...) and as rl=; "
                        "pass one of them"
                    )
            values.update(from_keys)
        else:
            raise TypeError(
                f"stats must be an InversionStats, a mapping or None, got {type(stats).__name__}"
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
            health=values,
            probe_precision=probe_precision,
        )
        added = self._window.add(record)
        if added.ready and not self._sender.wake.is_set():
            self._sender.wake.set()
        if added.outcome in ("queued", "spooled"):
            return
        if added.outcome == "overflow":
            self._warner.once(
                "overflow",
                f"telemetry buffer full ({self._window.max_buffer} unacknowledged records) and "
                "no spool_dir: dropping the oldest unsent records (counted in "
                "DeliveryReport.dropped). Pass spool_dir=... to keep them on disk, or raise "
                "max_buffer.",
            )
        elif added.outcome == "spool_error":
            spool = self._window.spool
            self._warner.once(
                "spool_write",
                f"cannot write the telemetry spool {spool.path if spool else ''} "
                f"({added.error}): records are kept in memory while there is room "
                "(max_buffer) and counted in DeliveryReport.spool_errors; what the spool "
                "already holds is kept. Free disk space to make them durable again. "
                "Training continues.",
            )
        else:
            self._warner.once(
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
        window = self._window
        with window.lock:
            target = window.next_idx
        self._sender.wake.set()
        with window.changed:
            while window.min_unresolved() < target:
                if self._sender.halted is not None or self._report is not None or self._forked:
                    return False
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                window.changed.wait(min(remaining, 0.5))
            return not window.lost_before(target)

    def report(self) -> DeliveryReport:
        """The counts so far (the final ones once closed)."""
        if self._report is not None:
            return self._report
        return self._window.report()

    def close(self, timeout_s: float = 10.0, *, status: RunStatus = "completed") -> DeliveryReport:
        """Deliver what is left within ``timeout_s``, then stop; idempotent.

        What is still unacknowledged at the deadline stays in the spool (with
        ``spool_dir``) or is counted as dropped. When everything was
        delivered the run's rank is closed on the server with ``status``.
        Returns the final :class:`DeliveryReport`. Never raises.
        """
        with self._close_lock:
            if self._report is not None:
                return self._report
            sender = self._sender
            deadline = time.monotonic() + max(timeout_s, 0.0)
            with self._window.lock:
                self._window.closed = True
                sender.close_status = status
                sender.close_deadline = deadline
                self._window.changed.notify_all()
            sender.closing.set()
            sender.wake.set()
            thread = self._thread
            if thread is not None and thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0.0))
                if thread.is_alive():
                    sender.interrupt()
                    thread.join(5.0)
            sender.abort.set()
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

    def _finish(self) -> DeliveryReport:
        """After the sender stopped: leave what is left in the spool or drop it."""
        report, error = self._window.finish(keep_spool=not self._forked)
        spool = self._window.spool
        if error is not None and spool is not None:
            logger.warning("could not write the telemetry spool %s: %s", spool.path, error)
        if not self._forked:
            self._sender.close_channel()
        if report.spooled:
            self._warner.once(
                "spooled",
                f"{report.spooled} telemetry records of run {self.run_id} rank {self.rank} were "
                f"not delivered and are kept in {spool.path if spool else ''}; a "
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

    # ------------------------------------------------------------ fork

    def _before_fork(self) -> None:
        if not self._forked:
            self._sender.before_fork()

    def _after_fork_in_parent(self) -> None:
        if not self._forked:
            self._sender.after_fork_in_parent()

    def _after_fork_in_child(self) -> None:
        """In a forked child: fresh state; never touch the parent's channel, spool, thread."""
        sender, window = self._sender, self._window
        _FORK_ORPHANS.append(sender)
        if window.spool is not None:
            window.spool.forget()
            _FORK_ORPHANS.append(window.spool)
        sender.after_fork_in_child()
        self._window = SendWindow(
            max_buffer=window.max_buffer, batch_size=window.batch_size, spool=None
        )
        self._window.closed = True
        self._sender = Sender(
            sender.endpoints,
            self._window,
            sender.run_info,
            rank=self.rank,
            settings=sender.settings,
            warner=self._warner,
            takeover=False,
        )
        self._sender.forked = True
        self._close_lock = threading.Lock()
        self._thread = None
        self._forked = True
        self._report = None
        logger.debug(
            "forked child %d: client of run %s rank %d is inert",
            os.getpid(),
            self.run_id,
            self.rank,
        )


def _given(
    name: str, loss: float | None, learning_rate: float | None, entropy_covariance: float | None
) -> bool:
    """Whether health value ``name`` was also passed as its own argument of ``log``."""
    given = {"loss": loss, "learning_rate": learning_rate, "entropy_covariance": entropy_covariance}
    return given.get(name) is not None


def _call_weak(weak: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = weak()
    if method is not None:
        method()
