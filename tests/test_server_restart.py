"""Restarting on the same database restores runs, latest state and acknowledgements.

Every test but the lock one runs on both store backends (the ``database`` fixture).
"""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.config import Limits, ServerConfig
from inversion_monitor.server.ingest import Ingestor
from inversion_monitor.server.schema import StoreError
from inversion_monitor.server.store import Store
from tests.postgres_support import TestDatabase
from tests.server_support import (
    TIMEOUT,
    acks,
    close_run,
    open_run,
    push,
    push_request,
    record,
    run_sample,
    running,
    samples,
    scrape_text,
    stub_for,
)


def test_restart_restores_runs_state_and_acks(tmp_path, database: TestDatabase):
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        open_run(stub, "run1", rank=0, name="alpha")
        open_run(stub, "run1", rank=1)
        open_run(stub, "run2", name="beta")
        push(stub, *(record("run1", s, spearman=-0.2) for s in (1, 2, 3)))
        # rank 1: 1, 2 and 4 arrive, 3 is still in flight; 2 is rejected (negative step)
        resp = push(
            stub,
            record("run1", 1, rank=1),
            record("run1", 2, rank=1, step=-1),
            record("run1", 4, rank=1),
        )
        assert acks(resp)[("run1", 1)] == 2 and len(resp.rejected) == 1
        close_run(stub, "run2", status="interrupted")

    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        assert open_run(stub, "run1", rank=0).acked_sequence == 3
        assert open_run(stub, "run1", rank=1, name="renamed").display_name == "alpha"
        text = scrape_text(server)
        assert run_sample(text, "inversion_monitor_step", "alpha") == 30
        assert run_sample(text, "inversion_monitor_spearman", "alpha") == -0.2
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="beta"), timeout=TIMEOUT)
        assert got.summary.status == "interrupted"
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="alpha"), timeout=TIMEOUT)
        assert got.summary.records == 5 and len(got.history) == 5

        # the client resends everything it had not seen acknowledged, plus the missing one
        resp = push(
            stub,
            *(record("run1", s, spearman=-0.2) for s in (1, 2, 3)),
            record("run1", 3, rank=1),
            record("run1", 4, rank=1),
            record("run1", 2, rank=1, step=-1),
        )
        assert (resp.accepted, resp.duplicates, len(resp.rejected)) == (1, 5, 0)
        assert acks(resp) == {("run1", 0): 3, ("run1", 1): 4}
        assert samples(scrape_text(server))[("inversion_monitor_records_duplicate_total", ())] == 5
        # a brand-new run after the restart does not collide with restored names
        assert open_run(stub, "run3", name="alpha").display_name == "alpha-2"

    rows = database.rows("SELECT rank, sequence FROM records ORDER BY rank, sequence")
    assert rows == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 3), (1, 4)]
    assert database.rows("SELECT rank, sequence FROM rejected") == [(1, 2)]


def _contiguous(done: set[int]) -> int:
    """Brute-force reference: the highest n with 1..n all done."""
    n = 0
    while n + 1 in done:
        n += 1
    return n


@settings(
    max_examples=40,
    deadline=None,
    # the database is emptied at the start of every example (database.fresh())
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 1), st.integers(0, 14), st.booleans()), max_size=12),
        max_size=8,
    ),
    restart_after=st.integers(0, 8),
)
def test_acks_match_a_brute_force_reference(database: TestDatabase, batches, restart_after):
    """Random pushes (dups, gaps, out of order, bad records, a restart) vs a set model."""
    limits = Limits(max_sequence_gap=10)
    cfg = ServerConfig(db=database.fresh(), limits=limits)
    ing = Ingestor(Store(cfg.db), cfg)
    info = monitor_pb2.RunInfo(run_id="r", world_size=2)
    # the writer sessions outlive the restart (they are stored)
    sessions = {
        rank: ing.open_run(monitor_pb2.OpenRunRequest(run=info, rank=rank), now=1.0)
        for rank in (0, 1)
    }
    done: dict[int, set[int]] = {0: set(), 1: set()}
    stored: set[tuple[int, int]] = set()
    for b, batch in enumerate(batches):
        if b == restart_after:
            ing.close()
            ing = Ingestor(Store(cfg.db), cfg)
        requests = {
            rank: monitor_pb2.PushRequest(writer_session=sessions[rank].writer_session)
            for rank in (0, 1)
        }
        expected_dups = expected_accepted = 0
        # the window for sequence numbers is measured from the ack before the push
        acked_before = {rank: _contiguous(seqs) for rank, seqs in done.items()}
        for rank, seq, good in batch:
            rec = requests[rank].records.add(run_id="r", rank=rank, sequence=seq, step=seq)
            if not good:
                rec.step = -1
            if seq == 0 or seq > acked_before[rank] + limits.max_sequence_gap:
                continue  # rejected without being recorded
            if seq in done[rank]:
                expected_dups += 1
                continue
            done[rank].add(seq)
            if good:
                expected_accepted += 1
                stored.add((rank, seq))
        # both ranks in one group commit
        results = ing.push_many([requests[0], requests[1]], now=2.0 + b)
        assert all(isinstance(r, monitor_pb2.PushResponse) for r in results)
        assert sum(r.duplicates for r in results) == expected_dups  # type: ignore[union-attr]
        assert sum(r.accepted for r in results) == expected_accepted  # type: ignore[union-attr]
        for resp in results:
            for ack in resp.acks:  # type: ignore[union-attr]
                assert ack.acked_sequence == _contiguous(done[ack.rank])
    ing.close()
    assert set(database.rows("SELECT rank, sequence FROM records")) == stored


def test_a_failed_commit_stores_and_acknowledges_nothing(tmp_path):
    cfg = ServerConfig(db=tmp_path / "m.db")
    ing = Ingestor(Store(cfg.db, busy_timeout_ms=50), cfg)
    info = monitor_pb2.RunInfo(run_id="r", world_size=1)
    token = ing.open_run(monitor_pb2.OpenRunRequest(run=info), now=1.0).writer_session
    ok = monitor_pb2.PushRequest(
        records=[monitor_pb2.StepRecord(run_id="r", sequence=1)], writer_session=token
    )
    assert ing.push(ok).acks[0].acked_sequence == 1
    blocker = sqlite3.connect(cfg.db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    group = [
        monitor_pb2.PushRequest(
            records=[monitor_pb2.StepRecord(run_id="r", sequence=s)], writer_session=token
        )
        for s in (2, 3)
    ]
    with pytest.raises(StoreError, match="locked"):
        ing.push_many(group)
    # memory changes only after a commit: nothing of the group counts as stored
    assert ing.views["r"].records == 1 and ing.counters.ingested == 1
    blocker.execute("ROLLBACK")
    blocker.close()
    results = ing.push_many(group)
    assert [r.acks[0].acked_sequence for r in results] == [2, 3]
    assert [r.accepted for r in results] == [1, 1]
    ing.close()


def test_concurrent_pushes_are_grouped_and_each_acknowledged(tmp_path, database: TestDatabase):
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        for run in range(4):
            open_run(stub, f"run{run}", name=f"n{run}")
        futures = [
            stub.Push.future(push_request(stub, record(f"run{run}", seq)), timeout=TIMEOUT)
            for seq in range(1, 26)
            for run in range(4)
        ]
        results = [f.result() for f in futures]
        assert all(r.accepted == 1 for r in results)
        final = push(stub, *(record(f"run{run}", 25) for run in range(4)))
        assert final.duplicates == 4
        assert acks(final) == {(f"run{run}", 0): 25 for run in range(4)}
    assert database.rows("SELECT count(*) FROM records") == [(100,)]
