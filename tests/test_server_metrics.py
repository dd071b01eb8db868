"""/metrics: the fast text rendering against prometheus_client's own, and max_active_runs."""

from __future__ import annotations

from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, generate_latest

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import Limits
from inversion_monitor.server.metrics import AlertCollector
from tests.server_support import (
    TIMEOUT,
    close_run,
    open_run,
    promtool_check,
    push,
    record,
    rpc_error,
    run_info,
    running,
    samples,
    scrape_text,
    stub_for,
    wait_until,
)


def _ours(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    skip = ("inversion_monitor_push_duration", "inversion_monitor_writer_queue_depth")
    return {
        key: value
        for key, value in samples(text).items()
        if key[0].startswith("inversion_monitor_") and not key[0].startswith(skip)
    }


def _stale_runs(text: str) -> set[str]:
    """The runs whose MonitorStale alert is active."""
    return {
        dict(labels)["run"]
        for (name, labels), value in _ours(text).items()
        if name == "inversion_monitor_alert_active"
        and dict(labels)["alertname"] == "MonitorStale"
        and value == 1
    }


def test_fast_rendering_matches_prometheus_client(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.toml"
    alerts.write_text("[stale]\nafter_s = 0.3\n")
    with (
        running(tmp_path, extended_metrics=True, alerts_config=alerts, retention="1h") as server,
        stub_for(server) as stub,
    ):
        open_run(stub, "quiet", name="quiet", world_size=1, project='we"ird\\pro\nject')
        push(stub, record("quiet", 1))
        for i in range(30):
            run_id = f"run{i}"
            open_run(stub, run_id, name=f"n{i}", world_size=1, framework="trl")
            recs = [record(run_id, s, spearman=None if s % 3 else -0.3) for s in (1, 2)]
            recs[0].loss = 1.5
            push(stub, *recs)
        close_run(stub, "run3", status="failed")
        push(stub, record("run1", 3, step=-1))  # a rejection
        # the stale check fires on a timer: wait until every open run (all but run3) has its
        # MonitorStale, so that no alert starts between the two renderings read below
        wait_until(
            "every open run's stale alert",
            lambda: len(_stale_runs(scrape_text(server))) == 30,
            TIMEOUT,
        )

        exposition = server.server.exposition
        reference = CollectorRegistry()
        reference.register(exposition.collector)
        assert exposition.alerts is not None
        reference.register(exposition.alerts)
        fast = exposition.render().decode()
        slow = generate_latest(reference).decode()
        assert _ours(fast) == _ours(slow)
        assert len(_ours(fast)) > 200
        assert promtool_check(fast).returncode == 0, promtool_check(fast).stderr
        # the cache follows the runs: a new record shows at once
        push(stub, record("run0", 3, step=99))
        assert samples(scrape_text(server))[("inversion_monitor_step", (("run", "n0"),))] == 99


def test_alert_collector_renders_like_prometheus_client() -> None:
    class Engine:
        def gauge_samples(self, include=lambda run_id: True):  # type: ignore[no-untyped-def]
            return [("a", "InversionLost", "critical", 1.0), ('b"x', "MonitorStale", "warning", 0)]

    collector = AlertCollector(Engine())
    registry = CollectorRegistry()
    registry.register(collector)
    assert samples(collector.render()) == samples(generate_latest(registry).decode())


def test_max_active_runs_counts_closed_runs_until_they_leave_retention(tmp_path: Path) -> None:
    with (
        running(tmp_path, limits=Limits(max_active_runs=2), retention="1s") as server,
        stub_for(server) as stub,
    ):
        for run_id in ("r1", "r2"):
            open_run(stub, run_id, world_size=1)
            close_run(stub, run_id)
        request = monitor_pb2.OpenRunRequest(run=run_info("r3", world_size=1))
        err = rpc_error(stub.OpenRun, request)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "within the retention window" in err.details()

        def opened() -> bool:
            try:
                stub.OpenRun(request, timeout=TIMEOUT)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            return True

        # the closed runs age out of the retention window
        wait_until("the closed runs to leave the retention window", opened, TIMEOUT)
