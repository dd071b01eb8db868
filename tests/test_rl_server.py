"""RL health end to end on a real server: run kind, RL fields, law fit, kind-aware alerts."""

from __future__ import annotations

import math
import random
import sqlite3
import time
from pathlib import Path

import pytest

from inversion_monitor.app.show import format_run
from inversion_monitor.app.tables import runs_table
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.rl.signals import RLStats
from inversion_monitor.server.schema import SCHEMA_VERSION
from inversion_monitor.server.store import Store
from inversion_monitor.telemetry.client import MonitorClient
from tests.server_support import (
    TIMEOUT,
    open_run,
    promtool_check,
    push,
    record,
    running,
    samples,
    scrape_text,
    stub_for,
    wait_until,
)

STATS = {"spearman": -0.5, "pearson": -0.4, "n": 64, "entropy_mean": 1.2, "score_mean": 3.4}


def law_records(run_id: str, count: int, seed: int = 0) -> list[monitor_pb2.StepRecord]:
    """An RL run on R = -0.4 e^H + 1.2 (ceiling 0.8) whose policy entropy is being spent."""
    rng = random.Random(seed)
    out = []
    for seq in range(1, count + 1):
        rec = record(run_id, seq)
        h = 0.02 + 1.5 * math.exp(-seq / 60) + rng.gauss(0.0, 0.01)
        rec.policy_entropy_mean = h
        rec.reward_mean = -0.4 * math.exp(h) + 1.2 + rng.gauss(0.0, 0.02)
        rec.entropy_covariance = 0.02
        out.append(rec)
    return out


def test_client_rl_run_round_trip(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        client = MonitorClient(server.grpc_target, "grpo run", run_id="rl-1", kind="rl")
        rl = RLStats(
            reward_std=0.2,
            policy_entropy_p10=0.1,
            policy_entropy_p50=0.9,
            policy_entropy_p90=2.0,
            advantage_mean=0.0,
            advantage_p10=-1.0,
            advantage_p90=1.0,
        )
        client.log(1, STATS, rl=rl)
        client.log(2, {**STATS, "reward_mean": 0.25, "reward_std": 0.1,
                       "policy_entropy_mean": 1.1, "entropy_covariance": 0.04})  # fmt: skip
        assert client.flush(timeout_s=TIMEOUT)
        client.close(timeout_s=TIMEOUT)
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="rl-1"), timeout=TIMEOUT)
        assert got.summary.run.kind == "rl"
        first, second = got.history
        assert (first.reward_std, first.advantage.p10, first.policy_entropy.p90) == (0.2, -1.0, 2.0)
        assert not first.HasField("reward_mean")
        assert (second.reward_mean, second.policy_entropy_mean) == (0.25, 1.1)
        assert second.entropy_covariance == 0.04
        text = scrape_text(server)
        got_samples = samples(text)
        run = (("run", "grpo-run"),)
        assert got_samples[("inversion_monitor_reward_mean", run)] == 0.25
        assert got_samples[("inversion_monitor_policy_entropy_mean_nats", run)] == 1.1
        assert got_samples[("inversion_monitor_entropy_covariance", run)] == 0.04
        assert got_samples[("inversion_monitor_run_kind", (("kind", "rl"), ("run", "grpo-run")))]
        assert promtool_check(text).returncode == 0
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
        table = runs_table(listed.runs, time.time())
        assert "KIND" in table.splitlines()[0] and " rl " in table
        shown = format_run(got)
        assert "kind rl" in shown and "REWARD" in shown and "0.250" in shown
    with pytest.raises(ValueError, match="kind='ppo' is invalid"):
        MonitorClient("127.0.0.1:9", "x", kind="ppo")
    idle = MonitorClient("127.0.0.1:9", "x", close_timeout_s=0)
    with pytest.raises(ValueError, match="RL signals given twice"):
        idle.log(1, {**STATS, "reward_mean": 0.1}, rl=RLStats())
    assert idle.close(timeout_s=0).logged == 0


def test_law_fit_and_entropy_exhaustion_on_a_server(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "rl-law", name="law", world_size=1, kind="rl")
        recs = law_records("rl-law", 300)
        for i in range(0, 300, 50):
            push(stub, *recs[i : i + 50])

        def ceiling() -> float | None:
            return samples(scrape_text(server)).get(
                ("inversion_monitor_entropy_law_ceiling", (("run", "law"),))
            )

        value = wait_until("the law's ceiling on /metrics", ceiling, timeout_s=20.0)
        got = samples(scrape_text(server))
        stderr = got[("inversion_monitor_entropy_law_ceiling_stderr", (("run", "law"),))]
        assert abs(value - 0.8) <= max(3 * stderr, 0.02)
        progress = got[("inversion_monitor_entropy_law_progress", (("run", "law"),))]
        assert 0.9 < progress <= 1.05
        run = stub.GetRun(monitor_pb2.GetRunRequest(run="law"), timeout=TIMEOUT)
        fired = [a for a in run.alerts if a.name == "EntropyExhaustion"]
        assert fired, [a.name for a in run.alerts]
        # it fired while the reward was still well short of its final level
        start = recs[fired[0].start_step // 10 - 1]
        assert start.reward_mean < 0.95 * 0.78
        assert fired[0].values["ceiling"] == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize(("kind", "alerted"), [("sft", False), ("rl", True), ("", True)])
def test_entropy_collapse_judges_by_run_kind(tmp_path: Path, kind: str, alerted: bool) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run-k", name="k", world_size=1, kind=kind)
        # entropy halves after the warm-up: learning in SFT, collapse in RL
        recs = [record("run-k", s, entropy=2.0 if s <= 40 else 0.6) for s in range(1, 81)]
        push(stub, *recs)
        stub.GetRun(monitor_pb2.GetRunRequest(run="k"), timeout=TIMEOUT)  # after the push
        names = {
            a.name for a in stub.GetRun(monitor_pb2.GetRunRequest(run="k"), timeout=TIMEOUT).alerts
        }
        assert ("EntropyCollapse" in names) is alerted


def test_bad_kind_and_rl_fields_are_refused_with_the_field(tmp_path: Path) -> None:
    import grpc

    with running(tmp_path) as server, stub_for(server) as stub:
        with pytest.raises(grpc.RpcError) as caught:
            open_run(stub, "bad", kind="ppo")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "run.kind" in str(caught.value.details())
        open_run(stub, "run1", world_size=1, kind="rl")
        bad_std = record("run1", 1, reward_std=-0.5)
        bad_pe = record("run1", 2)
        bad_pe.policy_entropy.p10 = -1.0
        fine = record("run1", 3, reward_mean=-2.0, reward_std=math.nan)
        fine.advantage.p10 = -3.0
        response = push(stub, bad_std, bad_pe, fine)
        assert [r.field for r in response.rejected] == [
            "records[0].reward_std",
            "records[1].policy_entropy.p10",
        ]
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="run1"), timeout=TIMEOUT)
        (stored,) = got.history
        assert stored.reward_mean == -2.0 and math.isnan(stored.reward_std)  # kept, named
        assert list(stored.nonfinite_fields) == ["reward_std"]
        assert stored.advantage.p10 == -3.0


def test_component_series_are_opt_in_and_bounded(tmp_path: Path) -> None:
    rec = record("run1", 1)
    for layer in range(12):
        for projection in ("q", "k", "v", "o"):
            rec.components.add(layer=layer, projection=projection, spearman=-0.1, score_mean=1.0)
    for options, expected in (({}, 0), ({"component_metrics": True}, 32)):
        folder = tmp_path / str(expected)
        folder.mkdir()
        with running(folder, **options) as server, stub_for(server) as stub:
            open_run(stub, "run1", name="c", world_size=1)
            push(stub, rec)
            text = scrape_text(server)
            series = [k for k in samples(text) if k[0] == "inversion_monitor_component_spearman"]
            assert len(series) == expected
            if expected:
                layers = {dict(labels)["layer"] for _, labels in series}
                assert layers == {str(n) for n in range(8)}  # lowest layers first, all four
                assert promtool_check(text).returncode == 0


_V1_SCHEMA = """
CREATE TABLE runs (pk INTEGER PRIMARY KEY, run_id TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL UNIQUE, project TEXT NOT NULL, info BLOB NOT NULL,
    world_size INTEGER NOT NULL, opened_time REAL NOT NULL, last_update_time REAL,
    last_activity_time REAL NOT NULL, status TEXT NOT NULL, records INTEGER NOT NULL DEFAULT 0);
CREATE TABLE ranks (run_pk INTEGER NOT NULL REFERENCES runs(pk), rank INTEGER NOT NULL,
    acked_sequence INTEGER NOT NULL, status TEXT NOT NULL, PRIMARY KEY (run_pk, rank))
    WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def test_a_schema_1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "monitor.db"
    conn = sqlite3.connect(db)
    conn.executescript(_V1_SCHEMA)
    info = monitor_pb2.RunInfo(run_id="old", name="old", world_size=1).SerializeToString()
    conn.execute(
        "INSERT INTO runs (run_id, display_name, project, info, world_size, opened_time,"
        " last_activity_time, status) VALUES ('old', 'old', '', ?, 1, 1.0, 1.0, 'completed')",
        (info,),
    )
    conn.commit()
    conn.close()
    with running(tmp_path, db=db) as server, stub_for(server) as stub:
        old = stub.GetRun(monitor_pb2.GetRunRequest(run="old"), timeout=TIMEOUT)
        assert old.summary.run.kind == "" and old.summary.status == "completed"
        open_run(stub, "new", name="new", world_size=1, kind="sft")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert dict(conn.execute("SELECT run_id, kind FROM runs").fetchall()) == {
        "old": "",
        "new": "sft",
    }
    conn.close()
    store = Store(db)  # opening a current database again changes nothing
    assert [r.kind for r in store.load_runs()] == ["", "sft"]
    store.close()


def test_the_law_is_refitted_from_the_database_after_a_restart(tmp_path: Path) -> None:
    def law_samples(server) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {
            name: value
            for (name, labels), value in samples(scrape_text(server)).items()
            if name.startswith("inversion_monitor_entropy_law_") and labels == (("run", "law"),)
        }

    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "rl-law", name="law", world_size=1, kind="rl")
        push(stub, *law_records("rl-law", 120))
        before = wait_until("the law's gauges", lambda: law_samples(server), timeout_s=20.0)
    with running(tmp_path) as server:
        after = law_samples(server)  # no new record: refitted from the stored ones
    assert after == pytest.approx(before) and len(after) == 3
