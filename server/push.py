"""One push in three steps: classify -> rows -> acks.

:func:`classify` finds the push's stream from its writer session and gives
each record a verdict (store, reject, duplicate); :func:`rows` turns the
verdicts into SQL rows and the response's rejections; :func:`acks` computes
the stream's acknowledgement state after the push. Nothing here changes the
writer's state: a :class:`Group` collects what the group's one transaction
writes, and the :class:`~.ingest.Ingestor` applies it once that has committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.auth import Grant
from inversion_monitor.server.config import Limits
from inversion_monitor.server.errors import InvalidArgument, PermissionDenied
from inversion_monitor.server.record_values import Observation
from inversion_monitor.server.sessions import (
    check_session,
    missing_session,
    rank_closed,
    session_digest,
    unknown_session,
)
from inversion_monitor.server.state import RankState, RunState
from inversion_monitor.server.store import FencedRank, RecordRow, RejectedRow
from inversion_monitor.server.validate import RecordProblem, RejectReason, validate_record


@dataclass(slots=True)
class Batch:
    """One push after :func:`classify`: its stream and each record's verdict."""

    run: RunState
    rank_no: int
    rank: RankState
    # (index in the push, record, its sequence, its values read once) to store
    store: list[tuple[int, monitor_pb2.StepRecord, int, Observation]] = field(default_factory=list)
    # (index, record, problem, keep): keep=True records the sequence as rejected for good
    reject: list[tuple[int, monitor_pb2.StepRecord, RecordProblem, bool]] = field(
        default_factory=list
    )
    # sequences stored or rejected for good by this push
    done: set[int] = field(default_factory=set)
    duplicates: int = 0
    nonfinite: int = 0


@dataclass
class Group:
    """What a group of pushes writes in its one transaction, and what to apply after."""

    rows: list[RecordRow] = field(default_factory=list)
    rejected_rows: list[RejectedRow] = field(default_factory=list)
    # (run_id, rank) -> acknowledgement state (acked, pending) after the group
    state: dict[tuple[str, int], tuple[int, set[int]]] = field(default_factory=dict)
    # (run_id, rank) -> the newest stored (sequence, record)
    newest: dict[tuple[str, int], tuple[int, monitor_pb2.StepRecord]] = field(default_factory=dict)
    # (run_id, rank) -> the newest stored probe record (one with inversion statistics)
    newest_probe: dict[tuple[str, int], tuple[int, monitor_pb2.StepRecord]] = field(
        default_factory=dict
    )
    # run_id -> records added
    added: dict[str, int] = field(default_factory=dict)
    # (run_id, rank) of every valid session that pushed (its activity time moves)
    streams: set[tuple[str, int]] = field(default_factory=set)
    # (run, record, its values read once): what the listeners get
    stored: list[tuple[RunState, monitor_pb2.StepRecord, Observation]] = field(default_factory=list)
    duplicates: int = 0
    nonfinite: int = 0
    reject_counts: dict[str, int] = field(default_factory=dict)

    def rank_rows(self, runs: dict[str, RunState], now: float) -> list[tuple[int, int, int, float]]:
        return [
            (runs[run_id].pk, rank_no, acked, now)
            for (run_id, rank_no), (acked, _) in self.state.items()
        ]

    def fenced_rows(self, runs: dict[str, RunState], now: float) -> list[FencedRank]:
        """Every pushed stream's ack with the session and session time this server last
        saw (a shared database writes it only if the row still holds them)."""
        out: list[FencedRank] = []
        for run_id, rank_no in self.streams:
            run = runs[run_id]
            rank = run.ranks[rank_no]
            acked = self.state.get((run_id, rank_no), (rank.acked, set()))[0]
            out.append((run.pk, rank_no, acked, now, rank.session, rank.session_time))
        return out

    def run_rows(
        self, runs: dict[str, RunState], now: float
    ) -> list[tuple[int, float | None, float, int]]:
        touched = {run_id for run_id, _ in self.state}
        return [
            (
                runs[run_id].pk,
                now if self.added.get(run_id) else None,
                now,
                self.added.get(run_id, 0),
            )
            for run_id in touched
        ]


def classify(
    request: monitor_pb2.PushRequest,
    *,
    runs: dict[str, RunState],
    sessions: dict[str, tuple[str, int]],
    limits: Limits,
    grant: Grant,
    group: Group,
    now: float,
) -> Batch | None:
    """The push's stream (from its writer session) and each record's verdict.

    Raises the :class:`~.errors.RequestError` that fails the push as a whole;
    returns None for an empty push without a session (nothing to do).
    """
    records = request.records
    if len(records) > limits.max_records_per_push:
        raise InvalidArgument(
            f"records has {len(records)} entries; max_records_per_push is "
            f"{limits.max_records_per_push}: send smaller batches"
        )
    session = request.writer_session
    if not session:
        if not records:
            return None
        first = records[0]
        raise missing_session(first.run_id, first.rank, "Push")
    stream = sessions.get(session_digest(session))
    if stream is None:
        first = records[0] if records else monitor_pb2.StepRecord(run_id="?")
        raise unknown_session(first.run_id, first.rank, "Push")
    run = runs[stream[0]]
    rank_no = stream[1]
    rank = run.ranks[rank_no]
    check_session(session, run.run_id, rank_no, rank.session, rank.previous_session, "Push")
    grant.check_write(run.info.project)
    if rank.status != "running":
        raise rank_closed(run.run_id, rank_no, rank.status, "Push")
    for i, rec in enumerate(records):
        if rec.run_id != run.run_id or rec.rank != rank_no:
            raise PermissionDenied(
                f"records[{i}] is for run {rec.run_id[:80]!r} rank {rec.rank}, but the "
                f"writer_session is for run {run.run_id!r} rank {rank_no}: a session writes "
                "only its own stream (one Push per (run, rank))"
            )
    batch = Batch(run, rank_no, rank)
    key = (run.run_id, rank_no)
    group.streams.add(key)
    acked, pending = group.state.get(key) or (rank.acked, rank.pending)
    max_gap = limits.max_sequence_gap
    done = batch.done
    for i, rec in enumerate(records):
        seq = rec.sequence
        if seq == 0 or seq > acked + max_gap:
            problem = RecordProblem(
                "sequence",
                RejectReason.BAD_SEQUENCE,
                f"sequence is {seq}; sequences start at 1 per (run, rank) without gaps and "
                f"may run at most max_sequence_gap={max_gap} ahead of the acknowledged "
                f"{acked}",
            )
            # cannot be recorded against (run, rank, sequence)
            batch.reject.append((i, rec, problem, False))
            continue
        if seq <= acked or seq in done or seq in pending:
            batch.duplicates += 1
            continue
        done.add(seq)
        try:
            nonfinite, values = validate_record(rec, limits, now)
        except RecordProblem as problem:
            batch.reject.append((i, rec, problem, True))
            continue
        batch.nonfinite += nonfinite
        batch.store.append((i, rec, seq, values))
    return batch


def rows(batch: Batch, now: float, group: Group, response: monitor_pb2.PushResponse) -> None:
    """The SQL rows of a classified push, and its rejections in the response."""
    run, rank_no = batch.run, batch.rank_no
    for i, rec, problem, keep in sorted(batch.reject, key=lambda item: item[0]):
        message = f"{problem.reason.value}: {problem.message}"
        response.rejected.add(
            run_id=rec.run_id,
            rank=rec.rank,
            sequence=rec.sequence,
            field=f"records[{i}].{problem.field}",
            reason=message,
        )
        reason = problem.reason.value
        group.reject_counts[reason] = group.reject_counts.get(reason, 0) + 1
        if keep:
            group.rejected_rows.append(
                (run.pk, rank_no, rec.sequence, f"records[{i}].{problem.field}", message, now)
            )
    rows = group.rows
    stored = group.stored
    pk = run.pk
    # the newest stored record, found on the way (sequences in batch.store are distinct)
    newest_seq = 0
    newest: monitor_pb2.StepRecord | None = None
    ascending = True
    # the values were read once, by the record's check (None: not sent)
    for _, rec, seq, values in batch.store:
        rows.append(
            (
                pk,
                rank_no,
                seq,
                values.step,
                values.wall_time,
                now,
                values.spearman,
                values.pearson,
                values.entropy_mean,
                values.score_mean,
                rec.SerializeToString(),
            )
        )
        stored.append((run, rec, values))
        if seq > newest_seq:
            newest_seq, newest = seq, rec
        else:
            ascending = False
    newest_probe_seq, newest_probe = _newest_probe(batch.store, ascending)
    if newest is not None:
        group.added[run.run_id] = group.added.get(run.run_id, 0) + len(batch.store)
        key = (run.run_id, rank_no)
        best = group.newest.get(key)
        if best is None or newest_seq > best[0]:
            group.newest[key] = (newest_seq, newest)
        if newest_probe is not None:
            best = group.newest_probe.get(key)
            if best is None or newest_probe_seq > best[0]:
                group.newest_probe[key] = (newest_probe_seq, newest_probe)
    response.accepted = len(batch.store)
    response.duplicates = batch.duplicates
    group.duplicates += batch.duplicates
    group.nonfinite += batch.nonfinite


def _newest_probe(
    store: list[tuple[int, monitor_pb2.StepRecord, int, Observation]], ascending: bool
) -> tuple[int, monitor_pb2.StepRecord | None]:
    """The newest stored record with inversion statistics (0, None if none): in a push in
    sequence order (the usual one), the last that has them, else the highest sequence of all."""
    if ascending:
        for _, rec, seq, _ in reversed(store):
            if rec.HasField("inversion"):
                return seq, rec
        return 0, None
    best_seq, best = 0, None
    for _, rec, seq, _ in store:
        if seq > best_seq and rec.HasField("inversion"):
            best_seq, best = seq, rec
    return best_seq, best


def acks(batch: Batch, group: Group, response: monitor_pb2.PushResponse) -> None:
    """The stream's acknowledgement state after the push (applied after the commit)."""
    run, rank_no, rank = batch.run, batch.rank_no, batch.rank
    key = (run.run_id, rank_no)
    acked, pending = group.state.get(key) or (rank.acked, rank.pending)
    if batch.done:
        pending = pending | batch.done
        while acked + 1 in pending:
            pending.discard(acked + 1)
            acked += 1
        group.state[key] = (acked, pending)
    if batch.done or batch.duplicates or batch.reject:
        response.acks.add(run_id=run.run_id, rank=rank_no, acked_sequence=acked)
