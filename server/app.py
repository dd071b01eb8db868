"""Assembles the monitor server: gRPC (service, health, reflection), HTTP and the store.

:class:`AsyncMonitorServer` runs on the caller's asyncio loop (the ``serve``
command); :class:`MonitorServer` runs the same on a background thread for
code that is not async (tests, notebooks, an embedding application).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inversion_monitor.server.alert_config import load_alerts_config
from inversion_monitor.server.alert_share import RESOLVED_RESEND_S, ActiveCheck, AlertSync
from inversion_monitor.server.alertmanager import AlertmanagerSink
from inversion_monitor.server.alerts import AlertEngine, AlertSink
from inversion_monitor.server.api import RunsApi
from inversion_monitor.server.auth import Authorizer
from inversion_monitor.server.component_metrics import ComponentCollector
from inversion_monitor.server.config import ServerConfig, join_address
from inversion_monitor.server.database import Connection
from inversion_monitor.server.entropy_law import EntropyLawCollector, EntropyLawMonitor
from inversion_monitor.server.hosts import host_names
from inversion_monitor.server.http import HttpEndpoint
from inversion_monitor.server.ingest import Ingestor
from inversion_monitor.server.listeners import IngestListener
from inversion_monitor.server.metrics import (
    AlertCollector,
    Exposition,
    MonitorCollector,
    add_queue_depth,
    build_registry,
)
from inversion_monitor.server.page import make_page_app
from inversion_monitor.server.replicas import SYNC_PERIOD_S, RunSync
from inversion_monitor.server.schema import StoreError
from inversion_monitor.server.service import (
    SERVICE_NAME,
    BearerTokenInterceptor,
    MonitorServicer,
    add_monitor_service,
)
from inversion_monitor.server.storage_state import StorageState
from inversion_monitor.server.store import Store, read_history
from inversion_monitor.server.writer import WriterThread

log = logging.getLogger("inversion_monitor.server")
_T = TypeVar("_T")
# most recent records per run replayed into the entropy-law fit after a restart
_LAW_RESTORE_RECORDS = 20_000


class AsyncMonitorServer:
    """The monitor server on the running asyncio loop.

    >>> async def main() -> int:
    ...     server = AsyncMonitorServer(ServerConfig(grpc_address="127.0.0.1:0",
    ...                                             http_address=None, db=":memory:"))
    ...     await server.start()
    ...     port = server.grpc_port
    ...     await server.stop()
    ...     return port
    >>> asyncio.run(main()) > 0
    True
    """

    def __init__(
        self, config: ServerConfig | None = None, *, listeners: Sequence[IngestListener] = ()
    ) -> None:
        self.config = config or ServerConfig()
        self._listeners = listeners
        self._server: grpc.aio.Server | None = None
        self._http: HttpEndpoint | None = None
        self._writer: WriterThread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._servicer: MonitorServicer | None = None
        self._health: health.aio.HealthServicer | None = None
        self._ingestor: Ingestor | None = None
        self._read_conn: Connection | None = None
        self._stopped = asyncio.Event()
        self.alerts: AlertEngine | None = None
        # the entropy-performance law fitted per RL run (inversion_monitor_entropy_law_*)
        self.entropy_law = EntropyLawMonitor()
        self._stale_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self.storage = StorageState()
        self._sinks: list[AlertSink] = []
        self.alertmanager: AlertmanagerSink | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.serving = False

    @property
    def grpc_target(self) -> str:
        """``host:port`` for ``grpc.insecure_channel`` / ``secure_channel``."""
        return join_address(self.config.grpc_host_port[0], self.grpc_port)

    @property
    def http_url(self) -> str | None:
        """``http://host:port`` of /metrics and /healthz, or None without HTTP."""
        return None if self._http is None else self._http.url

    @property
    def page_url(self) -> str | None:
        """``http://host:port/``: the live page, or None without HTTP."""
        return None if self._http is None else self._http.url + "/"

    @property
    def ingestor(self) -> Ingestor:
        if self._ingestor is None:
            raise RuntimeError("the server is not started")
        return self._ingestor

    def _restore_entropy_law(self) -> None:
        """Refit the law of the runs still on /metrics from their stored records (writer thread)."""
        ingestor = self.ingestor
        cutoff = time.time() - self.config.retention_s
        conn = ingestor.store.connection
        for view in list(ingestor.views.values()):
            if view.info.kind not in ("rl", "") or view.last_activity < cutoff:
                continue
            try:
                payloads = read_history(conn, view.pk, _LAW_RESTORE_RECORDS)
                self.entropy_law.restore(view.run_id, view.display_name, payloads)
            except Exception:  # a damaged record must not keep the server from starting
                log.exception("could not refit the entropy law of run %s", view.display_name)

    async def _read(self, fn: Callable[[], _T]) -> _T:
        """Run a database read on the reader thread (the writer's, for ``:memory:``)."""
        if self._reader is None:
            assert self._writer is not None
            return await self._writer.call(fn)
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn)

    def _read_connection(self) -> Connection:
        # called on the reader thread only
        if self._read_conn is None:
            self._read_conn = self.ingestor.store.database.reader()
        return self._read_conn

    async def start(self) -> None:
        """Open the database, restore state, bind the ports and start serving."""
        cfg = self.config
        self._writer = writer = WriterThread()
        memory = str(cfg.db) == ":memory:"
        listeners = list(self._listeners)
        self.entropy_law = EntropyLawMonitor(max_runs=cfg.limits.max_active_runs)
        listeners.append(self.entropy_law)
        try:
            if cfg.alerts:
                alerts_config = load_alerts_config(cfg.alerts_config)
                if cfg.alertmanager_url is not None:
                    self.alertmanager = AlertmanagerSink(
                        cfg.alertmanager_url,
                        resend_s=alerts_config.resend_s,
                        runbook_url=alerts_config.runbook_url,
                    )
                    self._sinks.append(self.alertmanager)
            store = await writer.call(lambda: Store(cfg.db))
            if store.shared and self.alertmanager is not None:  # re-post what every server holds
                check = ActiveCheck(store.database.reader)
                self.alertmanager.share(check, RESOLVED_RESEND_S)
            try:
                if cfg.alerts:
                    sinks = self._sinks
                    self.alerts = await writer.call(
                        lambda: AlertEngine(alerts_config, store, sinks=sinks)
                    )
                    listeners.append(self.alerts)
                self._ingestor = await writer.call(lambda: Ingestor(store, cfg, listeners))
            except BaseException:
                await writer.call(store.close)
                raise
            writer.ingestor = self._ingestor
            await writer.call(self._restore_entropy_law)
            if memory:  # one connection only: reads share the writer thread
                self._read_conn = self._ingestor.store.connection
            else:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="inversion-monitor-reader")
            collector = MonitorCollector(
                lambda: self.ingestor.views,
                lambda: self.ingestor.counters,
                cfg.retention_s,
                extended=cfg.extended_metrics,
            )
            self.registry, push_latency = build_registry()
            alert_collector = None
            if self.alerts is not None:
                alert_collector = AlertCollector(
                    self.alerts, lambda: self.ingestor.views, cfg.retention_s
                )
            self.registry.register(
                EntropyLawCollector(self.entropy_law, lambda: self.ingestor.views, cfg.retention_s)
            )
            if cfg.component_metrics:
                self.registry.register(
                    ComponentCollector(
                        lambda: self.ingestor.views,
                        cfg.retention_s,
                        max_per_run=cfg.component_series_per_run,
                    )
                )
            self.exposition = Exposition(collector, self.registry, alert_collector)
            limits = cfg.limits
            authorizer = Authorizer(cfg.tokens, cfg.scoped_tokens)
            self._servicer = MonitorServicer(
                self._ingestor,
                writer=writer,
                reader=self._read,
                read_connection=self._read_connection,
                push_latency=push_latency,
                max_pending=limits.max_pending_pushes,
                max_history=limits.max_history,
                alerts=self.alerts,
                authorizer=authorizer,
                storage=self.storage,
                max_history_bytes=limits.max_history_bytes,
                max_inflight_push_bytes=limits.max_inflight_push_bytes,
            )
            servicer = self._servicer
            add_queue_depth(self.registry, lambda: servicer.pending)
            auth = BearerTokenInterceptor(authorizer) if authorizer.enabled else None
            interceptors = [auth] if auth is not None else None
            options = [
                ("grpc.max_receive_message_length", limits.max_message_bytes),
                ("grpc.max_send_message_length", max(limits.max_message_bytes, 64 << 20)),
                ("grpc.so_reuseport", 0),
            ]
            self._server = grpc.aio.server(
                interceptors=interceptors,
                options=options,
                maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            )
            add_monitor_service(self._servicer, self._server)
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
            address = cfg.grpc_address
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())]
                )
                self.grpc_port = self._server.add_secure_port(address, credentials)
            else:
                self.grpc_port = self._server.add_insecure_port(address)
            if not self.grpc_port:
                raise OSError(f"could not bind gRPC address {address}")
            await self._server.start()
            http = cfg.http_host_port
            if http is not None:
                api = RunsApi(
                    servicer,
                    asyncio.get_running_loop(),
                    # the API reads only; the interceptor's token scopes apply to its calls
                    authorize=None if auth is None else _header_check(auth),
                    max_history=limits.max_history,
                    allowed_hosts=None if auth else host_names(http[0], cfg.allowed_hosts),
                    max_history_bytes=limits.max_history_bytes,
                )
                self._http = HttpEndpoint(
                    self.exposition.render,
                    self.health,
                    *http,
                    other=make_page_app(api),
                    metrics_authorize=_reads_all(authorizer) if cfg.metrics_token else None,
                    max_connections=limits.max_http_connections,
                    timeout_s=limits.http_timeout_s,
                    connection_max_s=limits.http_connection_max_s,
                )
                self.http_port = self._http.port
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.serving = True
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_storage())
            self._prune_task = asyncio.get_running_loop().create_task(
                self._every(
                    min(60.0, max(0.2, cfg.retention_s / 2)),
                    "pruning runs past retention",
                    self._prune_runs,
                )
            )
            if store.shared:  # other servers write to the same database: show their runs
                sync = RunSync(self.ingestor, cfg.limits.max_active_runs)
                shared_alerts = (
                    AlertSync(store.connection, self.alerts) if self.alerts is not None else None
                )

                def sync_round() -> None:
                    sync.run()
                    if shared_alerts is not None:  # after the runs: their alerts too
                        shared_alerts.run()

                self._sync_task = asyncio.get_running_loop().create_task(
                    self._every(SYNC_PERIOD_S, "reading other servers' runs", sync_round)
                )
            if self.alerts is not None and self.alerts.config.stale.enabled:
                period = min(5.0, self.alerts.config.stale.after_s / 4.0)
                engine = self.alerts
                self._stale_task = asyncio.get_running_loop().create_task(
                    self._every(period, "stale check", lambda: self._check_stale(engine))
                )
        except BaseException:
            await self._cleanup(grace_s=0)
            raise
        log.info("serving gRPC on %s, HTTP on %s", self.grpc_target, self.http_url)

    def health(self) -> str:
        """``ok``, ``degraded: <why>`` (the database takes no writes) or ``unavailable``."""
        if not self.serving:
            return "unavailable"
        return self.storage.health()

    async def _probe_storage(self, period: float = 1.0) -> None:
        """While degraded, try a tiny write every ``period`` s: recover without a request."""
        while True:
            await asyncio.sleep(period)
            writer = self._writer
            if writer is None:
                return
            if self.storage.problem is None:
                continue
            try:
                await writer.call(self.ingestor.store.probe_write)
            except StoreError:
                continue
            except Exception:
                log.exception("storage probe failed")
                continue
            self.storage.recovered()

    async def _every(self, period: float, what: str, work: Callable[[], object]) -> None:
        """Run ``work`` on the writer thread every ``period`` s until the writer is gone
        (a failure is logged and the next round comes as usual)."""
        while True:
            await asyncio.sleep(period)
            writer = self._writer
            if writer is None:
                return
            try:
                await writer.call(work)
            except Exception:
                log.exception("%s failed", what)

    def _prune_runs(self) -> None:
        """Drop the runs past retention from memory (writer thread)."""
        self.ingestor.prune(time.time())

    def _check_stale(self, engine: AlertEngine) -> None:
        """Evaluate MonitorStale (writer thread)."""
        engine.check_stale(self.ingestor.views, retention_s=self.config.retention_s)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving: health NOT_SERVING, finish in-flight calls, close the database."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        await self._cleanup(grace)

    async def _cleanup(self, grace_s: float) -> None:
        self.serving = False
        for task in (self._stale_task, self._probe_task, self._prune_task, self._sync_task):
            if task is not None:
                task.cancel()
        self._stale_task = self._probe_task = self._prune_task = self._sync_task = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._servicer is not None:
            self._servicer.stopping = True
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._http is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._http.stop)
            self._http = None
        loop = asyncio.get_running_loop()
        if self._reader is not None:
            await loop.run_in_executor(self._reader, self._close_reader)
            self._reader.shutdown(wait=True)
            self._reader = None
        if self._writer is not None:
            if self.alerts is not None:
                await self._writer.call(self.alerts.close)
            if self._ingestor is not None:
                await self._writer.call(self._ingestor.close)
            await loop.run_in_executor(None, self._writer.stop)
            self._writer = None
        if self.alertmanager is not None:
            await loop.run_in_executor(None, self.alertmanager.close)
            self.alertmanager = None
        self._stopped.set()

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    async def wait_closed(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()


def _header_check(auth: BearerTokenInterceptor) -> Callable[[str | None], bool]:
    """The gRPC token check applied to an HTTP ``Authorization`` header."""
    return lambda header: header is not None and auth.allowed((("authorization", header),))


def _reads_all(authorizer: Authorizer) -> Callable[[str | None], bool]:
    """Whether an HTTP ``Authorization`` header carries a token that reads every project."""

    def check(header: str | None) -> bool:
        grant = None if header is None else authorizer.grant((("authorization", header),))
        return grant is not None and grant.projects is None

    return check


class MonitorServer:
    """:class:`AsyncMonitorServer` on a background thread with its own event loop.

    >>> import grpc
    >>> from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
    >>> cfg = ServerConfig(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0",
    ...                    db=":memory:")
    >>> with MonitorServer(cfg) as server, grpc.insecure_channel(server.grpc_target) as ch:
    ...     stub = monitor_pb2_grpc.MonitorServiceStub(ch)
    ...     run = monitor_pb2.RunInfo(run_id="r1", name="my run", world_size=1)
    ...     stub.OpenRun(monitor_pb2.OpenRunRequest(run=run), timeout=5).display_name
    'my-run'
    """

    def __init__(
        self, config: ServerConfig | None = None, *, listeners: Sequence[IngestListener] = ()
    ) -> None:
        self.config = config or ServerConfig()
        self._listeners = listeners
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: AsyncMonitorServer | None = None

    @property
    def server(self) -> AsyncMonitorServer:
        if self._server is None:
            raise RuntimeError("the server is not started: call start() first")
        return self._server

    @property
    def grpc_port(self) -> int:
        return self.server.grpc_port

    @property
    def http_port(self) -> int:
        return self.server.http_port

    @property
    def grpc_target(self) -> str:
        """``host:port`` to dial."""
        return self.server.grpc_target

    @property
    def http_url(self) -> str | None:
        """``http://host:port`` (append ``/metrics`` or ``/healthz``), or None."""
        return self.server.http_url

    @property
    def page_url(self) -> str | None:
        """``http://host:port/``: the live page, or None without HTTP."""
        return self.server.page_url

    @property
    def ingestor(self) -> Ingestor:
        return self.server.ingestor

    def start(self, timeout_s: float = 30.0) -> MonitorServer:
        """Start and return once the ports are bound; re-raises a start-up error."""
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        server = AsyncMonitorServer(self.config, listeners=self._listeners)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_until_complete(server.wait_closed())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop, self._server = loop, server
        self._thread = threading.Thread(target=run, name="inversion-monitor-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"the monitor server did not start within {timeout_s} s")
        if failure:
            self._thread.join()
            self._thread = self._server = self._loop = None
            raise failure[0]
        return self

    def stop(self, grace_s: float | None = 1.0, timeout_s: float = 30.0) -> None:
        """Stop and wait for the thread (idempotent)."""
        if self._thread is None or self._loop is None or self._server is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop)
        future.result(timeout_s)
        self._thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> MonitorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
