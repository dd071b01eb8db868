"""The single writer: runs, acknowledgements, deduplication and the snapshot /metrics reads.

Every method that changes state (:meth:`Ingestor.open_run`, :meth:`Ingestor.push`,
:meth:`Ingestor.close_run`) must be called from one thread only, the writer
thread; it owns the SQLite connection. Memory changes only after the
transaction commits, so an acknowledgement never runs ahead of the database.
Readers on other threads use :attr:`Ingestor.views` (immutable
:class:`RunView` objects, replaced whole) and :attr:`Ingestor.counters`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.config import ServerConfig
from inversion_monitor.server.errors import (
    InvalidArgument,
    NotFound,
    RequestError,
    ResourceExhausted,
)
from inversion_monitor.server.listeners import IngestListener
from inversion_monitor.server.names import LABEL_KEY_RE, unique_display_name, valid_run_id
from inversion_monitor.server.series import gauge_values
from inversion_monitor.server.store import RecordRow, RejectedRow, Store
from inversion_monitor.server.validate import RecordProblem, RejectReason, check_record

log = logging.getLogger("inversion_monitor.server")

CLOSE_STATUSES = ("completed", "interrupted", "failed")  # by increasing severity
RUN_KINDS = ("", "sft", "rl", "custom")  # "": not given (older clients)
_RUN_INFO_MAX_LENGTHS = {
    "name": 256,
    "project": 128,
    "framework": 64,
    "model_type": 64,
    "client_version": 64,
    "config_json": 65_536,
}


@dataclass(slots=True)
class RankState:
    acked: int = 0
    # sequences persisted or rejected for good above ``acked``
    pending: set[int] = field(default_factory=set)
    latest_sequence: int = 0
    # the record with the highest sequence, without token samples; never mutated
    latest: monitor_pb2.StepRecord | None = None
    status: str = "running"


@dataclass(slots=True)
class RunState:
    pk: int
    run_id: str
    display_name: str
    info: monitor_pb2.RunInfo
    world_size: int
    opened_time: float
    last_update_time: float | None
    last_activity: float
    status: str
    records: int
    ranks: dict[int, RankState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunView:
    """An immutable snapshot of one run, safe to read from any thread."""

    run_id: str
    pk: int
    display_name: str
    info: monitor_pb2.RunInfo
    opened_time: float
    last_update_time: float | None
    last_activity: float
    status: str
    records: int
    # latest record of the lowest rank that has one: what /metrics shows
    metrics_record: monitor_pb2.StepRecord | None
    # the most recent record of any rank (highest step, then lowest rank)
    latest: monitor_pb2.StepRecord | None
    # series.ALL_GAUGES read from metrics_record
    values: tuple[float | None, ...]


@dataclass
class Counters:
    """Server-wide totals since start; plain ints written by the writer thread only."""

    ingested: int = 0
    # push transactions committed (several pushes may share one: group commit)
    commits: int = 0
    duplicates: int = 0
    nonfinite: int = 0
    listener_errors: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in RejectReason})


@dataclass
class _Group:
    """What a group of pushes writes in its one transaction, and what to publish after."""

    rows: list[RecordRow] = field(default_factory=list)
    rejected_rows: list[RejectedRow] = field(default_factory=list)
    # (run_pk, rank) -> (run_pk, rank, acked, status)
    ranks: dict[tuple[int, int], tuple[int, int, int, str]] = field(default_factory=dict)
    # run_pk -> records added
    added: dict[int, int] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    stored: list[tuple[RunState, int, int, monitor_pb2.StepRecord]] = field(default_factory=list)
    duplicates: int = 0
    nonfinite: int = 0
    reject_counts: dict[str, int] = field(default_factory=dict)

    def run_rows(self, now: float) -> list[tuple[int, float | None, float, int]]:
        return [(pk, now if added else None, now, added) for pk, added in self.added.items()]


def _stripped(record: monitor_pb2.StepRecord) -> monitor_pb2.StepRecord:
    copy = monitor_pb2.StepRecord()
    copy.CopyFrom(record)
    copy.ClearField("samples")
    return copy


class Ingestor:
    """Applies OpenRun / Push / CloseRun to the database and the in-memory state.

    >>> from pathlib import Path; import tempfile
    >>> tmp = tempfile.mkdtemp()
    >>> ing = Ingestor(Store(Path(tmp) / "m.db"), ServerConfig())
    >>> info = monitor_pb2.RunInfo(run_id="r1", name="demo", world_size=1)
    >>> ing.open_run(monitor_pb2.OpenRunRequest(run=info), now=1.0).display_name
    'demo'
    >>> rec = monitor_pb2.StepRecord(run_id="r1", sequence=1, step=10)
    >>> resp = ing.push(monitor_pb2.PushRequest(records=[rec, rec]), now=2.0)
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
        self._config = config
        self._limits = config.limits
        self._listeners = list(listeners)
        self._runs: dict[str, RunState] = {}
        self._names: set[str] = set()
        self.views: dict[str, RunView] = {}
        # display name -> run_id
        self.by_name: dict[str, str] = {}
        self.counters = Counters()
        self._load()

    def close(self) -> None:
        self._store.close()

    # ---------------------------------------------------------------- start-up

    def _load(self) -> None:
        by_pk: dict[int, RunState] = {}
        for row in self._store.load_runs():
            info = monitor_pb2.RunInfo.FromString(row.info)
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
            self._runs[run.run_id] = by_pk[run.pk] = run
            self._names.add(run.display_name)
        for stored in self._store.load_ranks():
            run = by_pk[stored.run_pk]
            rank = RankState(
                acked=stored.acked_sequence,
                pending=set(stored.pending),
                latest_sequence=stored.latest_sequence,
                status=stored.status,
            )
            # sequences that became contiguous (cannot happen with this writer, but be exact)
            while rank.acked + 1 in rank.pending:
                rank.pending.discard(rank.acked + 1)
                rank.acked += 1
            if stored.latest_payload is not None:
                rank.latest = _stripped(monitor_pb2.StepRecord.FromString(stored.latest_payload))
            run.ranks[stored.rank] = rank
        for run in self._runs.values():
            self._publish(run)
        if self._runs:
            log.info("restored %d runs from %s", len(self._runs), self._store.path)

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
        self.views[run.run_id] = RunView(
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
        self.by_name[run.display_name] = run.run_id

    def active_runs(self, now: float) -> int:
        """Runs not closed and active within the retention window."""
        retention = self._config.retention_s
        return sum(
            1
            for v in list(self.views.values())
            if v.status == "running" and now - v.last_activity <= retention
        )

    # ---------------------------------------------------------------- OpenRun

    def _check_run_info(self, info: monitor_pb2.RunInfo, rank: int) -> None:
        limits = self._limits
        if not valid_run_id(info.run_id):
            raise InvalidArgument(
                f"run.run_id is {info.run_id[:80]!r}; expected 1..64 characters of "
                "[A-Za-z0-9_.-] (e.g. uuid4().hex)"
            )
        for name, max_length in _RUN_INFO_MAX_LENGTHS.items():
            length = len(getattr(info, name))
            if length > max_length:
                raise InvalidArgument(
                    f"run.{name} has {length} characters; the limit is {max_length}"
                )
        if info.kind not in RUN_KINDS:
            raise InvalidArgument(
                f"run.kind is {info.kind[:40]!r}; expected 'sft', 'rl', 'custom' or empty"
            )
        if info.config_json:
            try:
                parsed = json.loads(info.config_json)
            except ValueError as exc:
                raise InvalidArgument(f"run.config_json is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise InvalidArgument("run.config_json must be a JSON object")
        if len(info.labels) > limits.max_labels:
            raise InvalidArgument(
                f"run.labels has {len(info.labels)} entries; max_labels is {limits.max_labels}"
            )
        for key, value in info.labels.items():
            if len(key) > limits.max_label_key_length or not LABEL_KEY_RE.match(key):
                raise InvalidArgument(
                    f"run.labels key {key[:80]!r} is invalid: expected [A-Za-z_][A-Za-z0-9_]* of "
                    f"at most max_label_key_length={limits.max_label_key_length} characters"
                )
            if len(value) > limits.max_label_value_length:
                raise InvalidArgument(
                    f"run.labels[{key!r}] has {len(value)} characters; "
                    f"max_label_value_length is {limits.max_label_value_length}"
                )
        if rank >= limits.max_ranks_per_run:
            raise InvalidArgument(
                f"rank is {rank}; max_ranks_per_run is {limits.max_ranks_per_run}"
            )
        if info.world_size and rank >= info.world_size:
            raise InvalidArgument(
                f"rank is {rank} but run.world_size is {info.world_size}; ranks are 0..world_size-1"
            )

    def open_run(
        self, request: monitor_pb2.OpenRunRequest, now: float | None = None
    ) -> monitor_pb2.OpenRunResponse:
        """Register the run (idempotent) and the caller's rank; report its acked sequence."""
        now = time.time() if now is None else now
        if not request.HasField("run"):
            raise InvalidArgument("run is missing: OpenRunRequest.run must carry the RunInfo")
        info, rank_no = request.run, request.rank
        self._check_run_info(info, rank_no)
        run = self._runs.get(info.run_id)
        if run is None:
            limit = self._limits.max_active_runs
            if self.active_runs(now) >= limit:
                raise ResourceExhausted(
                    f"the server already has {limit} active runs (max_active_runs={limit}); "
                    "close finished runs or raise the limit",
                    retry_after_s=30.0,
                )
            stored_info = monitor_pb2.RunInfo()
            stored_info.CopyFrom(info)
            display = unique_display_name(info.name, info.run_id, self._names.__contains__)
            with self._store.transaction():
                pk = self._store.insert_run(
                    info.run_id,
                    display,
                    info.project,
                    stored_info.SerializeToString(),
                    info.world_size,
                    now,
                    info.kind,
                )
                self._store.upsert_rank(pk, rank_no, 0, "running")
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
            run.ranks[rank_no] = RankState()
            self._runs[run.run_id] = run
            self._names.add(display)
            log.info("opened run %s (%s) rank %d", display, run.run_id, rank_no)
        else:
            if run.world_size and rank_no >= run.world_size:
                raise InvalidArgument(
                    f"rank is {rank_no} but the run was opened with world_size "
                    f"{run.world_size}; ranks are 0..world_size-1"
                )
            rank = run.ranks.get(rank_no)
            world_size = max(run.world_size, info.world_size)
            with self._store.transaction():
                self._store.update_run(
                    run.pk, world_size=world_size, last_activity_time=now, status="running"
                )
                self._store.upsert_rank(run.pk, rank_no, rank.acked if rank else 0, "running")
            if rank is None:
                rank = run.ranks[rank_no] = RankState()
            rank.status = "running"
            run.status = "running"
            run.world_size = world_size
            run.last_activity = now
        self._publish(run)
        return monitor_pb2.OpenRunResponse(
            run_id=run.run_id,
            display_name=run.display_name,
            acked_sequence=run.ranks[rank_no].acked,
        )

    # ---------------------------------------------------------------- CloseRun

    def close_run(
        self, request: monitor_pb2.CloseRunRequest, now: float | None = None
    ) -> monitor_pb2.CloseRunResponse:
        """Mark a rank finished; the run's status is the worst once every rank is closed."""
        now = time.time() if now is None else now
        run = self._runs.get(request.run_id)
        if run is None:
            raise NotFound(f"run {request.run_id[:80]!r} is not known to this server")
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
        statuses = [status if n == request.rank else r.status for n, r in run.ranks.items()]
        run_status = "running" if "running" in statuses else max(statuses, key=CLOSE_STATUSES.index)
        with self._store.transaction():
            self._store.upsert_rank(run.pk, request.rank, rank.acked, status)
            self._store.update_run(
                run.pk, world_size=run.world_size, last_activity_time=now, status=run_status
            )
        rank.status = status
        run.status = run_status
        run.last_activity = now
        self._publish(run)
        return monitor_pb2.CloseRunResponse(acked_sequence=rank.acked)

    # ---------------------------------------------------------------- Push

    def push(
        self, request: monitor_pb2.PushRequest, now: float | None = None
    ) -> monitor_pb2.PushResponse:
        """Store a batch in one transaction; answer acks, rejections and counts."""
        (result,) = self.push_many([request], now)
        if isinstance(result, RequestError):
            raise result
        return result

    def push_many(
        self, requests: Sequence[monitor_pb2.PushRequest], now: float | None = None
    ) -> list[monitor_pb2.PushResponse | RequestError]:
        """Several pushes in one transaction (group commit), each answered on its own.

        A request that fails as a whole (unknown run, malformed) gets its
        :class:`RequestError` in the list and changes nothing. If the
        transaction fails, memory is reloaded from the database and the
        exception propagates: nothing of the group was stored or acknowledged.
        """
        now = time.time() if now is None else now
        group = _Group()
        results: list[monitor_pb2.PushResponse | RequestError] = []
        try:
            for request in requests:
                try:
                    results.append(self._push_one(request, now, group))
                except RequestError as exc:
                    results.append(exc)
            if group.ranks:
                self._store.write_push(
                    group.rows, group.rejected_rows, group.ranks.values(), group.run_rows(now)
                )
        except BaseException:
            self._reload()
            raise
        # committed: make it visible
        counters = self.counters
        counters.commits += 1 if group.ranks else 0
        counters.ingested += len(group.stored)
        counters.duplicates += group.duplicates
        counters.nonfinite += group.nonfinite
        for reason, count in group.reject_counts.items():
            counters.rejected[reason] += count
        for run_id in group.touched:
            self._publish(self._runs[run_id])
        if self._listeners:
            self._notify(group.stored)
        return results

    def _reload(self) -> None:
        log.warning("reloading the in-memory state from the database after a failed write")
        self._runs = {}
        self._names = set()
        self._load()

    def _push_one(
        self, request: monitor_pb2.PushRequest, now: float, group: _Group
    ) -> monitor_pb2.PushResponse:
        """Validate, queue the rows into ``group`` and update acks in memory (not views)."""
        records = request.records
        limits = self._limits
        if len(records) > limits.max_records_per_push:
            raise InvalidArgument(
                f"records has {len(records)} entries; max_records_per_push is "
                f"{limits.max_records_per_push}: send smaller batches"
            )
        runs = self._runs
        for i, rec in enumerate(records):
            if rec.run_id not in runs:
                if not valid_run_id(rec.run_id):
                    raise InvalidArgument(
                        f"records[{i}].run_id is {rec.run_id[:80]!r}; expected 1..64 characters "
                        "of [A-Za-z0-9_.-]"
                    )
                raise NotFound(
                    f"records[{i}].run_id: run {rec.run_id!r} is not open on this server; "
                    "call OpenRun first"
                )

        rows: list[RecordRow] = []
        rejected_rows: list[RejectedRow] = []
        response = monitor_pb2.PushResponse()
        rejected_out = response.rejected
        # (run_id, rank) -> sequences persisted or rejected for good in this push
        done: dict[tuple[str, int], set[int]] = {}
        stored: list[tuple[RunState, int, int, monitor_pb2.StepRecord]] = []
        reject_counts: dict[str, int] = {}
        duplicates = nonfinite = 0
        max_ranks = limits.max_ranks_per_run
        max_gap = limits.max_sequence_gap

        for i, rec in enumerate(records):
            run = runs[rec.run_id]
            rank_no = rec.rank
            seq = rec.sequence
            key = (run.run_id, rank_no)
            batch_done = done.get(key)
            if batch_done is None:
                batch_done = done[key] = set()
            rank = run.ranks.get(rank_no)
            acked = rank.acked if rank is not None else 0
            problem: RecordProblem | None = None
            if rank_no >= max_ranks:
                problem = RecordProblem(
                    "rank",
                    RejectReason.BAD_RANK,
                    f"rank is {rank_no}; max_ranks_per_run is {max_ranks}",
                )
            elif seq == 0 or seq > acked + max_gap:
                problem = RecordProblem(
                    "sequence",
                    RejectReason.BAD_SEQUENCE,
                    f"sequence is {seq}; sequences start at 1 per (run, rank) without gaps and "
                    f"may run at most max_sequence_gap={max_gap} ahead of the acknowledged "
                    f"{acked}",
                )
            if problem is not None:  # cannot be recorded against (run, rank, sequence)
                self._reject(rejected_out, reject_counts, i, rec, problem)
                continue
            if seq <= acked or seq in batch_done or (rank is not None and seq in rank.pending):
                duplicates += 1
                continue
            batch_done.add(seq)
            if run.world_size and rank_no >= run.world_size:
                problem = RecordProblem(
                    "rank",
                    RejectReason.BAD_RANK,
                    f"rank is {rank_no} but the run's world_size is {run.world_size}",
                )
            else:
                try:
                    nonfinite += check_record(rec, limits, now)
                except RecordProblem as exc:
                    problem = exc
            if problem is not None:
                message = self._reject(rejected_out, reject_counts, i, rec, problem)
                rejected_rows.append(
                    (run.pk, rank_no, seq, f"records[{i}].{problem.field}", message, now)
                )
                continue
            inv = rec.inversion
            spearman = inv.spearman
            pearson = inv.pearson
            rows.append(
                (
                    run.pk,
                    rank_no,
                    seq,
                    rec.step,
                    rec.wall_time,
                    now,
                    spearman.value if spearman.HasField("value") else None,
                    pearson.value if pearson.HasField("value") else None,
                    rec.entropy.mean if rec.entropy.HasField("mean") else None,
                    rec.score.mean if rec.score.HasField("mean") else None,
                    rec.SerializeToString(),
                )
            )
            stored.append((run, rank_no, seq, rec))

        # acknowledgement state after this push, applied only once it has committed
        new_state: dict[tuple[str, int], tuple[int, set[int]]] = {}
        rank_rows: list[tuple[int, int, int, str]] = []
        for key, seqs in done.items():
            run = runs[key[0]]
            rank = run.ranks.get(key[1])
            acked = rank.acked if rank is not None else 0
            if not seqs:
                continue
            pending = (rank.pending | seqs) if rank is not None else set(seqs)
            while acked + 1 in pending:
                pending.discard(acked + 1)
                acked += 1
            new_state[key] = (acked, pending)
            rank_rows.append((run.pk, key[1], acked, rank.status if rank else "running"))
        accepted_by_run: dict[str, int] = {}
        for run, _, _, _ in stored:
            accepted_by_run[run.run_id] = accepted_by_run.get(run.run_id, 0) + 1
        touched = {key[0] for key, seqs in done.items() if seqs}
        run_rows = [
            (
                runs[run_id].pk,
                now if accepted_by_run.get(run_id) else None,
                now,
                accepted_by_run.get(run_id, 0),
            )
            for run_id in touched
        ]
        group.rows.extend(rows)
        group.rejected_rows.extend(rejected_rows)
        for row in rank_rows:
            group.ranks[row[0], row[1]] = row
        for pk, _, _, added in run_rows:
            group.added[pk] = group.added.get(pk, 0) + added
        group.touched.update(touched)
        group.stored.extend(stored)
        group.duplicates += duplicates
        group.nonfinite += nonfinite
        for reason, count in reject_counts.items():
            group.reject_counts[reason] = group.reject_counts.get(reason, 0) + count

        # apply to memory (the caller reloads it if the transaction fails)
        for (run_id, rank_no), (acked, pending) in new_state.items():
            run = runs[run_id]
            rank = run.ranks.get(rank_no)
            if rank is None:
                rank = run.ranks[rank_no] = RankState()
            rank.acked = acked
            rank.pending = pending
        newest: dict[tuple[str, int], tuple[int, monitor_pb2.StepRecord]] = {}
        for run, rank_no, seq, rec in stored:
            key = (run.run_id, rank_no)
            best = newest.get(key)
            if best is None or seq > best[0]:
                newest[key] = (seq, rec)
        for (run_id, rank_no), (seq, rec) in newest.items():
            rank = runs[run_id].ranks[rank_no]
            if seq > rank.latest_sequence:
                rank.latest_sequence = seq
                rank.latest = _stripped(rec)
        for run_id in touched:
            run = runs[run_id]
            added = accepted_by_run.get(run_id, 0)
            if added:
                run.records += added
                run.last_update_time = now
            run.last_activity = now

        for run_id, rank_no in done:
            rank = runs[run_id].ranks.get(rank_no)
            response.acks.add(run_id=run_id, rank=rank_no, acked_sequence=rank.acked if rank else 0)
        response.accepted = len(stored)
        response.duplicates = duplicates
        return response

    @staticmethod
    def _reject(
        out: Iterable[monitor_pb2.RejectedRecord],
        counts: dict[str, int],
        index: int,
        rec: monitor_pb2.StepRecord,
        problem: RecordProblem,
    ) -> str:
        message = f"{problem.reason.value}: {problem.message}"
        out.add(  # type: ignore[attr-defined]
            run_id=rec.run_id,
            rank=rec.rank,
            sequence=rec.sequence,
            field=f"records[{index}].{problem.field}",
            reason=message,
        )
        counts[problem.reason.value] = counts.get(problem.reason.value, 0) + 1
        return message

    def _notify(self, stored: Sequence[tuple[RunState, int, int, monitor_pb2.StepRecord]]) -> None:
        for listener in self._listeners:
            for run, _, _, rec in stored:
                try:
                    listener.on_record(run.run_id, run.display_name, rec)
                except Exception:
                    if not self.counters.listener_errors:
                        log.exception("ingest listener %r failed (logged once)", listener)
                    self.counters.listener_errors += 1
