"""Open a run, push records, read them back through GetRun, ListRuns and /metrics."""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request

import grpc
import pytest

from inversion_monitor.app.tables import runs_table
from inversion_monitor.proto.v1 import monitor_pb2
from tests.postgres_support import TestDatabase
from tests.server_support import (
    TIMEOUT,
    acks,
    close_run,
    open_run,
    promtool_check,
    push,
    record,
    rpc_error,
    run_sample,
    running,
    samples,
    scrape_text,
    session,
    stub_for,
    wait_until,
)


def test_round_trip_getrun_listruns_and_metrics(tmp_path, database: TestDatabase):
    with (
        running(tmp_path, db=database.target, extended_metrics=True) as server,
        stub_for(server) as stub,
    ):
        opened = open_run(stub, "run1", name="GPT-2 small / lr=3e-4")
        assert opened.display_name == "GPT-2-small-lr-3e-4"
        assert opened.acked_sequence == 0
        recs = [record("run1", s, spearman=-0.1 * s, entropy=3.0 - 0.1 * s) for s in (1, 2, 3)]
        recs[1].samples.add(entropy=1.5, score=0.3, token_id=7)
        resp = push(stub, *recs)
        assert (resp.accepted, resp.duplicates, list(resp.rejected)) == (3, 0, [])
        assert acks(resp) == {("run1", 0): 3}

        got = stub.GetRun(monitor_pb2.GetRunRequest(run="run1"), timeout=TIMEOUT)
        assert [r.sequence for r in got.history] == [1, 2, 3]
        assert got.history[1] == recs[1]  # stored exactly, token samples included
        summary = got.summary
        assert summary.display_name == "GPT-2-small-lr-3e-4"
        assert summary.records == 3 and summary.status == "running"
        assert summary.latest.step == 30 and not summary.latest.samples
        assert summary.run.project == "proj" and not summary.active_alerts
        by_name = stub.GetRun(
            monitor_pb2.GetRunRequest(run="GPT-2-small-lr-3e-4", history_limit=2), timeout=TIMEOUT
        )
        assert [r.sequence for r in by_name.history] == [2, 3]

        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
        assert [r.display_name for r in listed.runs] == ["GPT-2-small-lr-3e-4"]
        table = runs_table(listed.runs, time.time())
        assert "GPT-2-small-lr-3e-4" in table and "-0.300" in table and "2.700" in table

        text = scrape_text(server)
        run = "GPT-2-small-lr-3e-4"
        assert run_sample(text, "inversion_monitor_spearman", run) == pytest.approx(-0.3)
        assert run_sample(text, "inversion_monitor_pearson", run) == pytest.approx(-0.15)
        assert run_sample(text, "inversion_monitor_tokens_sampled", run) == 512
        assert run_sample(text, "inversion_monitor_entropy_mean_nats", run) == pytest.approx(2.7)
        assert run_sample(text, "inversion_monitor_logit_grad_norm_mean", run) == 0.25
        assert run_sample(text, "inversion_monitor_step", run) == 30
        updated = run_sample(text, "inversion_monitor_last_update_timestamp_seconds", run)
        assert updated is not None and abs(updated - time.time()) < 60
        all_samples = samples(text)
        assert all_samples[("inversion_monitor_records_ingested_total", ())] == 3
        assert all_samples[("inversion_monitor_active_runs", ())] == 1
        assert (
            all_samples[("inversion_monitor_records_rejected_total", (("reason", "out_of_range"),))]
            == 0
        )
        p90 = run_sample(text, "inversion_monitor_entropy_p90_nats", run)
        assert p90 == pytest.approx(2.7 * 1.5)
        info = [k for k in all_samples if k[0] == "inversion_monitor_run_info"]
        assert dict(info[0][1])["project"] == "proj"
        assert all_samples[("inversion_monitor_push_duration_seconds_count", ())] == 1

        checked = promtool_check(text)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_follow_the_lowest_rank_and_skip_missing_values(tmp_path):
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1", rank=0)
        open_run(stub, "run1", rank=1)
        # rank 1 reports first and further ahead; rank 0 has no Spearman (NaN -> missing)
        push(stub, record("run1", 1, rank=1, step=50, spearman=-0.9))
        text = scrape_text(server)
        assert run_sample(text, "inversion_monitor_spearman", "demo-run") == -0.9
        resp = push(stub, record("run1", 1, rank=0, step=40, spearman=math.nan))
        assert resp.accepted == 1 and not resp.rejected
        text = scrape_text(server)
        assert run_sample(text, "inversion_monitor_step", "demo-run") == 40
        assert run_sample(text, "inversion_monitor_spearman", "demo-run") is None
        assert run_sample(text, "inversion_monitor_pearson", "demo-run") is None
        # without --extended-metrics: only the basic per-run series
        assert "inversion_monitor_entropy_p90_nats" not in text
        assert "inversion_monitor_run_info" not in text
        assert not any(math.isnan(v) for v in samples(text).values())
        # spearman.value and pearson.value were NaN
        assert samples(text)[("inversion_monitor_nonfinite_values_total", ())] == 2
        # the summary's latest is the most advanced record of any rank
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="run1"), timeout=TIMEOUT)
        assert got.summary.latest.rank == 1 and got.summary.latest.step == 50
        assert promtool_check(text).returncode == 0


def test_display_names_are_sanitised_and_unique(tmp_path):
    with running(tmp_path, extended_metrics=True) as server, stub_for(server) as stub:
        names = [
            open_run(stub, f"id{i}", name=name).display_name
            for i, name in enumerate(["exp", "exp", 'we"ird\n{name}', "", "exp"])
        ]
        assert names == ["exp", "exp-2", "we-ird-name", "run-id3", "exp-3"]
        text = scrape_text(server)
        for name in names:
            assert ("inversion_monitor_run_info" in text) and f'run="{name}"' in text
        assert promtool_check(text).returncode == 0


def test_open_run_is_idempotent_and_close_sets_status(tmp_path):
    with running(tmp_path) as server, stub_for(server) as stub:
        first = open_run(stub, "run1", rank=0)
        push(stub, record("run1", 1), record("run1", 2))
        again = open_run(stub, "run1", rank=0, name="another name")
        assert (again.display_name, again.acked_sequence) == (first.display_name, 2)
        assert open_run(stub, "run1", rank=1).acked_sequence == 0

        closed = close_run(stub, "run1", rank=0, status="completed")
        assert closed.acked_sequence == 2
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="run1"), timeout=TIMEOUT)
        assert got.summary.status == "running"  # rank 1 is still running
        close_run(stub, "run1", rank=1, status="failed")
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="run1"), timeout=TIMEOUT)
        assert got.summary.status == "failed"
        assert samples(scrape_text(server))[("inversion_monitor_active_runs", ())] == 0

        bad = rpc_error(
            stub.CloseRun,
            monitor_pb2.CloseRunRequest(
                run_id="run1", rank=0, status="done", writer_session=session(stub, "run1", 0)
            ),
        )
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "completed, interrupted, failed" in bad.details()
        missing = rpc_error(stub.CloseRun, monitor_pb2.CloseRunRequest(run_id="nope"))
        assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_idle_runs_leave_metrics_after_retention_but_stay_in_the_database(
    tmp_path, database: TestDatabase
):
    with running(tmp_path, db=database.target, retention="1s") as server, stub_for(server) as stub:
        open_run(stub, "old", name="old")
        push(stub, record("old", 1))
        assert run_sample(scrape_text(server), "inversion_monitor_step", "old") == 10

        def without_old() -> str | None:
            text = scrape_text(server)
            return text if run_sample(text, "inversion_monitor_step", "old") is None else None

        text = wait_until("the idle run to leave /metrics", without_old, 10)
        assert 'run="old"' not in text
        assert samples(text)[("inversion_monitor_active_runs", ())] == 0
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
        assert [r.display_name for r in listed.runs] == ["old"]
        # activity brings it back
        push(stub, record("old", 2))
        assert run_sample(scrape_text(server), "inversion_monitor_step", "old") == 20
    assert database.rows("SELECT count(*) FROM records") == [(2,)]
    if not database.postgres:
        assert database.rows("PRAGMA journal_mode") == [("wal",)]


def test_http_health_and_unknown_paths(tmp_path):
    with running(tmp_path) as server:
        assert server.http_url is not None
        with urllib.request.urlopen(server.http_url + "/healthz", timeout=TIMEOUT) as resp:
            assert resp.status == 200 and resp.read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.http_url + "/nope", timeout=TIMEOUT)
        assert err.value.code == 404


def test_list_runs_filters_by_project_and_limits(tmp_path):
    with running(tmp_path) as server, stub_for(server) as stub:
        for i in range(5):
            open_run(stub, f"r{i}", name=f"n{i}", project="a" if i % 2 else "b")
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(project="a"), timeout=TIMEOUT)
        assert sorted(r.display_name for r in listed.runs) == ["n1", "n3"]
        two = stub.ListRuns(monitor_pb2.ListRunsRequest(limit=2), timeout=TIMEOUT)
        assert [r.display_name for r in two.runs] == ["n4", "n3"]  # newest activity first
        missing = rpc_error(stub.GetRun, monitor_pb2.GetRunRequest(run="nope"))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
