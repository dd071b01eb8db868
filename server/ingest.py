"""The single writer: runs, writer sessions, acknowledgements and the snapshot /metrics reads.

Every method that changes state (:meth:`Ingestor.open_run`, :meth:`Ingestor.push`,
:meth:`Ingestor.close_run`) must be called from one thread only, the writer
thread; it owns the store's writer connection. Memory changes only after the
transaction commits, so an acknowledgement never runs ahead of the database
and a failed write (a full disk) leaves nothing to undo. Readers on other
threads use :attr:`Ingestor.views` (immutable :class:`RunView` objects,
replaced whole) and :attr:`Ingestor.counters`.

A push goes through the three steps of :mod:`.push` (classify -> rows ->
acks); what they produce is applied to memory by :meth:`Ingestor._apply` once
the group's transaction has committed.

On a shared database (PostgreSQL, several servers) memory is a cache: OpenRun,
CloseRun and a Push with a session granted elsewhere read the stream back first,
and a push's acks are fenced (:meth:`~.store.Store.write_push`), so a stream that
moves between servers loses and duplicates nothing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import archive
from inversion_monitor.server import push as steps
from inversion_monitor.server.auth import FULL_ACCESS, Grant
from inversion_monitor.server.config import ServerConfig
from inversion_monitor.server.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceExhausted,
)
from inversion_monitor.server.listeners import IngestListener, Listeners
from inversion_monitor.server.names import base_display_name
from inversion_monitor.server.redact import redact_run_info
from inversion_monitor.server.series import gauge_values, run_lines
from inversion_monitor.server.sessions import (
    check_session,
    new_session,
    rank_closed,
    session_digest,
    stream_taken,
)
from inversion_monitor.server.state import (
    Counters,
    RankState,
    RunState,
    RunView,
    stripped,
    with_last_probe,
)
from inversion_monitor.server.store import Store, StoredRank, StoredRun
from inversion_monitor.server.store_errors import StreamMoved
from inversion_monitor.server.validate import check_run_info

__all__ = ["CLOSE_STATUSES", "Counters", "Ingestor", "RankState", "RunState", "RunView"]

log = logging.getLogger("inversion_monitor.server")

CLOSE_STATUSES = ("completed", "interrupted", "failed")  # by increasing severity


class Ingestor:
    """Applies OpenRun / Push / CloseRun to the database and the in-memory state.

    >>> from pathlib import Path; import tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> ing = Ingestor(Store(Path(tmp) / "m.db"), ServerConfig())
    >>> info = monitor_pb2.RunInfo(run_id="r1", name="demo", world_size=1)
    >>> opened = ing.open_run(monitor_pb2.OpenRunRequest(run=info), now=1.0)
    >>> opened.display_name
    'demo'
    >>> rec = monitor_pb2.StepRecord(run_id="r1", sequence=1, step=10)
    >>> push = monitor_pb2.PushRequest(records=[rec, rec], writer_session=opened.writer_session)
    >>> resp = ing.push(push, now=2.0)
    >>> resp.accepted, resp.duplicates, resp.acks[0].acked_sequence
    (1, 1, 1)
    >>> ing.close()
    """

    def __init__(
        self,
        store: Store,
        config: ServerConfig,
        listeners: Sequence[IngestListener] = (),
    ) -> None:
        self._store = store
        # other servers may write to the same database: memory is only a cache
        self._shared = store.shared
        self._config = config
        self._limits = config.limits
        self.counters = Counters()
        # every listener error is logged (at most one line per 10 s) and counted
        self._listeners = Listeners(listeners, log, self._listener_failed)
        self._runs: dict[str, RunState] = {}
        self._names: set[str] = set()
        # base display name -> the next suffix to try (keeps OpenRun O(1) for repeated names)
        self._name_next: dict[str, int] = {}
        # session digest -> (run_id, rank), for current and just-replaced sessions
        self._sessions: dict[str, tuple[str, int]] = {}
        # run_id -> last activity, oldest first; runs past retention are dropped lazily
        self._recent: OrderedDict[str, float] = OrderedDict()
        self.views: dict[str, RunView] = {}
        # display name -> run_id
        self.by_name: dict[str, str] = {}
        self._load()

    @property
    def store(self) -> Store:
        return self._store

    def close(self) -> None:
        self._store.close()

    # ---------------------------------------------------------------- start-up

    def _load(self) -> None:
        by_pk: dict[int, RunState] = {}
        for row in self._store.load_runs():
            run = self._restore_run(row)
            by_pk[run.pk] = run
        for stored in self._store.load_ranks():
            self._restore_rank(by_pk[stored.run_pk], stored)
        for run in sorted(self._runs.values(), key=lambda r: r.last_activity):
            self._recent[run.run_id] = run.last_activity
            self._publish(run)
            self._notify_open(run)
        if self._runs:
            log.info("restored %d runs from %s", len(self._runs), self._store.path)

    def _restore_run(self, row: StoredRun) -> RunState:
        info = monitor_pb2.RunInfo.FromString(row.info)
        info.DiscardUnknownFields()
        redact_run_info(info)  # rows stored before redaction existed
        if not info.kind and row.kind:
            info.kind = row.kind
        run = RunState(
            pk=row.pk,
            run_id=row.run_id,
            display_name=row.display_name,
            info=info,
            world_size=row.world_size,
            opened_time=row.opened_time,
            last_update_time=row.last_update_time,
            last_activity=row.last_activity_time,
            status=row.status,
            records=row.records,
        )
        self._runs[run.run_id] = run
        self._names.add(run.display_name)
        return run

    def _restore_rank(self, run: RunState, stored: StoredRank) -> None:
        rank = RankState(
            acked=stored.acked_sequence,
            pending=set(stored.pending),
            latest_sequence=stored.latest_sequence,
            status=stored.status,
            session=stored.session,
            previous_session=stored.previous_session,
            session_time=stored.session_time,
        )
        # sequences that became contiguous (cannot happen with this writer, but be exact)
        while rank.acked + 1 in rank.pending:
            rank.pending.discard(rank.acked + 1)
            rank.acked += 1
        if stored.probe_payload is not None:
            probe = monitor_pb2.StepRecord.FromString(stored.probe_payload)
            rank.latest_probe = stripped(probe)
            rank.latest_probe_sequence = stored.probe_sequence
        if stored.latest_payload is not None:
            latest = monitor_pb2.StepRecord.FromString(stored.latest_payload)
            rank.latest = with_last_probe(latest, rank.latest_probe)
        run.ranks[stored.rank] = rank
        for digest in (rank.session, rank.previous_session):
            if digest is not None:
                self._sessions[digest] = (run.run_id, stored.rank)

    # ---------------------------------------------------------------- retention

    def prune(self, now: float) -> int:
        """Drop from memory the runs not active within the retention window; returns how many.

        They stay in the database; :meth:`revive` reads one back when a call names it.
        """
        cutoff = now - self._config.retention_s
        old = [run for run in self._runs.values() if run.last_activity < cutoff]
        for run in old:
            self._forget(run)
        if len(self._name_next) > 4 * max(len(self._runs), 1024):
            self._name_next.clear()  # a cache: the database still knows every name
        return len(old)

    def _forget(self, run: RunState) -> None:
        del self._runs[run.run_id]
        self.views.pop(run.run_id, None)
        if self.by_name.get(run.display_name) == run.run_id:
            del self.by_name[run.display_name]
        self._names.discard(run.display_name)
        self._recent.pop(run.run_id, None)
        self._drop_sessions(run)
        self._listeners.run_pruned(run.run_id)

    def _drop_sessions(self, run: RunState) -> None:
        for rank in run.ranks.values():
            for digest in (rank.session, rank.previous_session):
                if digest is not None and self._sessions.get(digest, ("",))[0] == run.run_id:
                    del self._sessions[digest]

    def revive(self, key: str, *, by_name: bool = False) -> RunState | None:
        """The run with id ``key`` (or, ``by_name``, display name), read back from the
        database if it was pruned; None when there is none. Writer thread."""
        run = self._runs.get(key)
        if run is None and by_name:
            run_id = self.by_name.get(key)
            run = self._runs.get(run_id) if run_id is not None else None
        if run is not None:
            return run
        row = archive.find_stored_run(self._store.connection, key)
        if row is None or (not by_name and row.run_id != key) or row.run_id in self._runs:
            return None
        run = self._restore_run(row)
        for stored in self._store.load_ranks(run.pk):
            self._restore_rank(run, stored)
        self._publish(run)  # not touched: the next prune drops it again unless it is used
        self._notify_open(run)
        return run

    def refresh(self, run_id: str) -> RunState | None:
        """:meth:`revive`, and on a shared database the run as it is stored now. Writer thread."""
        run = self._runs.get(run_id)
        if not self._shared or run is None:
            return self.revive(run_id)
        row = archive.find_stored_run(self._store.connection, run_id)
        if row is None or row.run_id != run_id:
            return run
        ranks = self._store.load_ranks(run.pk)
        run.world_size, run.status, run.records = row.world_size, row.status, row.records
        run.last_update_time = row.last_update_time
        run.last_activity = max(run.last_activity, row.last_activity_time)
        self._drop_sessions(run)
        run.ranks.clear()
        for stored in ranks:
            self._restore_rank(run, stored)
        self._publish(run)
        return run

    def revive_all(self, run_ids: Sequence[str]) -> int:
        """Read back the pruned runs ``run_ids`` (those ListRuns shows); returns how many."""
        return sum(self.revive(run_id) is not None for run_id in run_ids)

    # ---------------------------------------------------------------- views

    def _publish(self, run: RunState) -> None:
        metrics_record = latest = None
        for rank_no in sorted(run.ranks):
            rec = run.ranks[rank_no].latest
            if rec is None:
                continue
            if metrics_record is None:
                metrics_record = rec
            if latest is None or rec.step > latest.step:
                latest = rec
        view = RunView(
            run_id=run.run_id,
            pk=run.pk,
            display_name=run.display_name,
            info=run.info,
            opened_time=run.opened_time,
            last_update_time=run.last_update_time,
            last_activity=run.last_activity,
            status=run.status,
            records=run.records,
            metrics_record=metrics_record,
            latest=latest,
            values=gauge_values(metrics_record),
        )
        self.views[run.run_id] = replace(view, lines=run_lines(view, self._config.extended_metrics))
        self.by_name[run.display_name] = run.run_id

    def _touch(self, run: RunState, now: float) -> None:
        run.last_activity = now
        recent = self._recent
        recent[run.run_id] = now
        recent.move_to_end(run.run_id)

    def runs_within_retention(self, now: float) -> int:
        """Runs active (opened, pushed or closed) within the retention window; O(1) amortised."""
        recent = self._recent
        cutoff = now - self._config.retention_s
        while recent:
            run_id, last = next(iter(recent.items()))
            if last >= cutoff:
                break
            del recent[run_id]
        return len(recent)

    def _unique_name(self, name: str, run_id: str) -> str:
        base = base_display_name(name, run_id)
        n = self._name_next.get(base, 1)
        candidate = base if n == 1 else f"{base}-{n}"
        # never another run's id: a name resolves to one run (service.find_run); runs pruned
        # from memory keep their names in the database
        while (
            candidate in self._names
            or candidate in self._runs
            or archive.name_taken(self._store.connection, candidate)
        ):
            n += 1
            candidate = f"{base}-{n}"
        self._name_next[base] = n + 1
        return candidate

    # ---------------------------------------------------------------- OpenRun

    def open_run(
        self,
        request: monitor_pb2.OpenRunRequest,
        now: float | None = None,
        grant: Grant = FULL_ACCESS,
    ) -> monitor_pb2.OpenRunResponse:
        """Register the run (idempotent) and grant a writer session for (run, rank).

        Raises ALREADY_EXISTS while another session holds the stream (active and
        not closed) unless ``request.takeover``; reports the rank's acked sequence.
        """
        now = time.time() if now is None else now
        if not request.HasField("run"):
            raise InvalidArgument("run is missing: OpenRunRequest.run must carry the RunInfo")
        info, rank_no = request.run, request.rank
        check_run_info(info, rank_no, self._limits)
        run = self.refresh(info.run_id)
        if run is not None and not grant.allows(run.info.project):
            # another project's run: say neither its project nor more than a refusal
            raise PermissionDenied(
                f"run.run_id {info.run_id!r} cannot be opened with this token: use another "
                "run_id (e.g. uuid4().hex)"
            )
        # an existing run keeps the project it was opened with
        grant.check_write(run.info.project if run is not None else info.project)
        session, digest = new_session()
        if run is None:
            limit = self._limits.max_active_runs
            if self.runs_within_retention(now) >= limit:
                raise ResourceExhausted(
                    f"the server already has {limit} runs active within the retention window "
                    f"(max_active_runs={limit}); wait for runs to age out (--retention) or "
                    "raise the limit",
                    retry_after_s=30.0,
                )
            stored_info = monitor_pb2.RunInfo()
            stored_info.CopyFrom(info)
            stored_info.DiscardUnknownFields()
            redact_run_info(stored_info)
            display = self._unique_name(info.name, info.run_id)
            with self._store.transaction():
                pk = self._store.insert_run(
                    info.run_id,
                    display,
                    stored_info.project,
                    stored_info.SerializeToString(),
                    info.world_size,
                    now,
                    info.kind,
                )
                self._store.upsert_rank(pk, rank_no, 0, "running", digest, None, now)
            run = RunState(
                pk=pk,
                run_id=info.run_id,
                display_name=display,
                info=stored_info,
                world_size=info.world_size,
                opened_time=now,
                last_update_time=None,
                last_activity=now,
                status="running",
                records=0,
            )
            run.ranks[rank_no] = RankState(session=digest, session_time=now)
            self._runs[run.run_id] = run
            self._names.add(display)
            log.info("opened run %s (%s) rank %d", display, run.run_id, rank_no)
            self._notify_open(run)
        else:
            if run.world_size and rank_no >= run.world_size:
                raise InvalidArgument(
                    f"rank is {rank_no} but the run was opened with world_size "
                    f"{run.world_size}; ranks are 0..world_size-1"
                )
            rank = run.ranks.get(rank_no)
            previous = None
            if rank is not None and rank.session is not None:
                idle = now - rank.session_time
                held = rank.status == "running" and idle <= self._config.writer_idle_timeout_s
                if held and not request.takeover:
                    raise stream_taken(
                        run.run_id, rank_no, max(idle, 0.0), self._config.writer_idle_timeout_s
                    )
                previous = rank.session
            world_size = max(run.world_size, info.world_size)
            acked = rank.acked if rank else 0
            with self._store.transaction():
                self._store.update_run(
                    run.pk, world_size=world_size, last_activity_time=now, status="running"
                )
                self._store.upsert_rank(run.pk, rank_no, acked, "running", digest, previous, now)
            if rank is None:
                rank = run.ranks[rank_no] = RankState()
            if rank.previous_session is not None:
                self._sessions.pop(rank.previous_session, None)
            rank.previous_session = previous
            rank.session = digest
            rank.session_time = now
            rank.status = "running"
            run.status = "running"
            run.world_size = world_size
            if previous is not None:
                log.info(
                    "run %s rank %d: a new writer session replaces the previous one (%s)",
                    run.display_name,
                    rank_no,
                    "takeover" if request.takeover else "idle or closed",
                )
        self._sessions[digest] = (run.run_id, rank_no)
        self._touch(run, now)
        self._publish(run)
        return monitor_pb2.OpenRunResponse(
            run_id=run.run_id,
            display_name=run.display_name,
            acked_sequence=run.ranks[rank_no].acked,
            writer_session=session,
        )

    # ---------------------------------------------------------------- CloseRun

    def close_run(
        self,
        request: monitor_pb2.CloseRunRequest,
        now: float | None = None,
        grant: Grant = FULL_ACCESS,
    ) -> monitor_pb2.CloseRunResponse:
        """Mark a rank finished; the run's status is the worst once every rank is closed."""
        now = time.time() if now is None else now
        run = self.refresh(request.run_id)
        if run is None or not grant.allows(run.info.project):  # another project's: unknown
            raise NotFound(f"run {request.run_id[:80]!r} is not known to this server")
        grant.check_write(run.info.project)
        status = request.status or "completed"
        if status not in CLOSE_STATUSES:
            raise InvalidArgument(
                f"status is {request.status[:40]!r}; expected one of {', '.join(CLOSE_STATUSES)}"
            )
        rank = run.ranks.get(request.rank)
        if rank is None:
            raise NotFound(
                f"rank {request.rank} never opened run {run.run_id!r}; call OpenRun first"
            )
        check_session(
            request.writer_session,
            run.run_id,
            request.rank,
            rank.session,
            rank.previous_session,
            "CloseRun",
        )
        if rank.status != "running":
            raise rank_closed(run.run_id, request.rank, rank.status, "CloseRun")
        statuses = [status if n == request.rank else r.status for n, r in run.ranks.items()]
        run_status = "running" if "running" in statuses else max(statuses, key=CLOSE_STATUSES.index)
        with self._store.transaction():
            self._store.upsert_rank(
                run.pk,
                request.rank,
                rank.acked,
                status,
                rank.session,
                rank.previous_session,
                now,
            )
            self._store.update_run(
                run.pk, world_size=run.world_size, last_activity_time=now, status=run_status
            )
        rank.status = status
        rank.session_time = now
        run.status = run_status
        self._touch(run, now)
        self._publish(run)
        return monitor_pb2.CloseRunResponse(acked_sequence=rank.acked)

    # ---------------------------------------------------------------- Push

    def push(
        self,
        request: monitor_pb2.PushRequest,
        now: float | None = None,
        grant: Grant = FULL_ACCESS,
    ) -> monitor_pb2.PushResponse:
        """Store a batch in one transaction; answer acks, rejections and counts."""
        (result,) = self.push_many([request], now, [grant])
        if isinstance(result, RequestError):
            raise result
        return result

    def push_many(
        self,
        requests: Sequence[monitor_pb2.PushRequest],
        now: float | None = None,
        grants: Sequence[Grant] | None = None,
    ) -> list[monitor_pb2.PushResponse | RequestError]:
        """Several pushes in one transaction (group commit), each answered on its own.

        A request that fails as a whole (bad session, malformed) gets its
        :class:`RequestError` in the list and changes nothing. If the
        transaction fails, the exception propagates and memory is untouched:
        nothing of the group was stored or acknowledged.
        """
        now = time.time() if now is None else now
        grants = grants if grants is not None else [FULL_ACCESS] * len(requests)
        for request in requests:  # read back a pruned run, or a session another server granted
            if request.records and (
                request.records[0].run_id not in self._runs
                or (self._shared and session_digest(request.writer_session) not in self._sessions)
            ):
                self.refresh(request.records[0].run_id)
        try:
            return self._push_group(requests, now, grants)
        except StreamMoved:  # another server wrote to one of the streams: read them back
            for request in requests:
                if request.records:
                    self.refresh(request.records[0].run_id)
        return self._push_group(requests, now, grants)  # moved again: a StoreError, retried

    def _push_group(
        self,
        requests: Sequence[monitor_pb2.PushRequest],
        now: float,
        grants: Sequence[Grant],
    ) -> list[monitor_pb2.PushResponse | RequestError]:
        group = steps.Group()
        results: list[monitor_pb2.PushResponse | RequestError] = []
        for request, grant in zip(requests, grants, strict=True):
            try:
                batch = steps.classify(
                    request,
                    runs=self._runs,
                    sessions=self._sessions,
                    limits=self._limits,
                    grant=grant,
                    group=group,
                    now=now,
                )
            except RequestError as exc:
                results.append(exc)
                continue
            if batch is None:  # an empty push without a session: nothing to do
                results.append(monitor_pb2.PushResponse())
                continue
            response = monitor_pb2.PushResponse()
            steps.rows(batch, now, group, response)
            steps.acks(batch, group, response)
            results.append(response)
        if self._shared and group.streams:  # every stream's ack, fenced
            fenced = group.fenced_rows(self._runs, now)
            run_rows = group.run_rows(self._runs, now)
            self._store.write_push(group.rows, group.rejected_rows, (), run_rows, fenced)
        elif group.state:
            self._store.write_push(
                group.rows,
                group.rejected_rows,
                group.rank_rows(self._runs, now),
                group.run_rows(self._runs, now),
            )
        self._apply(group, now)
        return results

    def _apply(self, group: steps.Group, now: float) -> None:
        """Make a committed group visible: acks, latest records, counters, views, listeners."""
        runs = self._runs
        for (run_id, rank_no), (acked, pending) in group.state.items():
            rank = runs[run_id].ranks[rank_no]
            rank.acked = acked
            rank.pending = pending
        for (run_id, rank_no), (seq, rec) in group.newest_probe.items():
            rank = runs[run_id].ranks[rank_no]
            if seq > rank.latest_probe_sequence:
                rank.latest_probe_sequence = seq
                rank.latest_probe = stripped(rec)
        for (run_id, rank_no), (seq, rec) in group.newest.items():
            rank = runs[run_id].ranks[rank_no]
            if seq > rank.latest_sequence:
                rank.latest_sequence = seq
                rank.latest = with_last_probe(rec, rank.latest_probe)
        for run_id, rank_no in group.streams:
            runs[run_id].ranks[rank_no].session_time = now
        touched = {run_id for run_id, _ in group.state}
        for run_id in touched:
            run = runs[run_id]
            added = group.added.get(run_id, 0)
            if added:
                run.records += added
                run.last_update_time = now
            self._touch(run, now)
        counters = self.counters
        counters.commits += 1 if group.state else 0
        counters.ingested += len(group.stored)
        counters.duplicates += group.duplicates
        counters.nonfinite += group.nonfinite
        for reason, count in group.reject_counts.items():
            counters.rejected[reason] += count
        for run_id in touched:
            self._publish(runs[run_id])
        if self._listeners and group.stored:
            self._listeners.records(
                [(run.run_id, run.display_name, rec, values) for run, rec, values in group.stored]
            )

    def _notify_open(self, run: RunState) -> None:
        self._listeners.run_open(run.run_id, run.display_name, run.info)

    def _listener_failed(self) -> None:
        self.counters.listener_errors += 1
