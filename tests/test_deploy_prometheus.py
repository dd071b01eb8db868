"""A real Prometheus scrapes a live server; every Grafana panel query returns data."""

from __future__ import annotations

import json
import math
import random
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from inversion_monitor.proto.v1 import monitor_pb2
from tests.server_support import (
    free_port,
    open_run,
    push,
    ready_process,
    record,
    running,
    stub_for,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = Path("/usr/bin/prometheus")
DASHBOARD = ROOT / "deploy" / "grafana" / "inversion-monitor.json"
RUN = "dash-run"


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def records(first: int, count: int, rho: float, rng: random.Random) -> list[monitor_pb2.StepRecord]:
    out = []
    for seq in range(first, first + count):
        value = math.tanh(rng.gauss(math.atanh(rho), math.sqrt(1.06 / 61)))
        rec = record("run1", seq, spearman=value, entropy=2.0 + rng.random() * 0.1)
        rec.inversion.n = 64
        rec.wall_time = time.time()
        # an RL run on the entropy-performance law R = -0.4 e^H + 1.2 (the RL panels)
        policy_entropy = 0.3 + 1.2 * math.exp(-seq / 50)
        rec.policy_entropy_mean = policy_entropy
        rec.reward_mean = 1.2 - 0.4 * math.exp(policy_entropy) + rng.gauss(0.0, 0.01)
        rec.entropy_covariance = 0.01 + rng.gauss(0.0, 0.002)
        # training health of every step; the grad norm jumps at record 70 (GradNormSpike)
        rec.loss = 2.0 * math.exp(rng.gauss(0.0, 0.02))
        rec.grad_norm = (30.0 if seq >= 70 else 1.0) * math.exp(rng.gauss(0.0, 0.05))
        rec.kl = 0.02 * math.exp(rng.gauss(0.0, 0.1))
        rec.completion_length_mean = 40.0 * math.exp(rng.gauss(0.0, 0.05))
        for layer in (0, 1):
            for projection in ("q", "o"):
                rec.components.add(
                    layer=layer, projection=projection, spearman=value, score_mean=1.0 + layer
                )
        out.append(rec)
    return out


@contextmanager
def running_prometheus(tmp_path: Path, config_text: str) -> Iterator[str]:
    """A real Prometheus on ``config_text`` (next to the shipped rules.yml); yields its URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(config_text)
    (tmp_path / "rules.yml").write_text((ROOT / "deploy/prometheus/rules.yml").read_text())
    port = free_port()
    command = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    base = f"http://127.0.0.1:{port}"
    with ready_process(command, base, "prometheus"):
        yield base


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """Yields (Prometheus URL, a function pushing n more records)."""
    with (
        running(tmp_path, extended_metrics=True, component_metrics=True) as server,
        stub_for(server) as stub,
    ):
        open_run(stub, "run1", name=RUN, kind="rl")
        rng = random.Random(5)
        # a weakening run: the alert panel has a series
        push(stub, *records(1, 60, -0.5, rng))
        push(stub, *records(61, 40, -0.1, rng))
        state = {"next": 101}

        def more(n: int = 5) -> None:
            push(stub, *records(state["next"], n, -0.1, rng))
            state["next"] += n

        assert server.http_url is not None
        target = server.http_url.removeprefix("http://")
        text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
        assert '"127.0.0.1:9464"' in text and "scrape_interval: 15s" in text
        text = (
            text.replace('"127.0.0.1:9464"', f'"{target}"')
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        )
        with running_prometheus(tmp_path, text) as base:
            yield base, more


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "inversion-monitor"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["run"]["definition"] == "label_values(inversion_monitor_step, run)"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    assert len(panel_queries()) >= 15


def test_every_panel_query_returns_data(prometheus: tuple[str, Any]) -> None:
    base, more = prometheus

    # wait until Prometheus has several scrapes of the run (rates need two)
    def scraped_often() -> bool:
        more()
        got = api(
            base, "query", query=f'count_over_time(inversion_monitor_step{{run="{RUN}"}}[1m])'
        )
        return bool(got["result"]) and float(got["result"][0]["value"][1]) >= 4

    wait_until("Prometheus to scrape the server four times", scraped_often, 60)
    runs = api(base, "label/run/values", **{"match[]": "inversion_monitor_step"})
    assert RUN in runs
    empty = []
    for title, expr in panel_queries():
        query = expr.replace("$run", RUN)
        if not api(base, "query", query=query)["result"]:
            empty.append(f"{title}: {query}")
    assert empty == []
    alerts = api(base, "query", query=f'inversion_monitor_alert_active{{run="{RUN}"}}')["result"]
    assert {r["metric"]["alertname"] for r in alerts} >= {"InversionWeakening", "GradNormSpike"}
    rules = api(base, "rules")
    assert sum(len(g["rules"]) for g in rules["groups"]) == 31
    kinds = api(base, "query", query=f'inversion_monitor_run_kind{{run="{RUN}"}}')["result"]
    assert [r["metric"]["kind"] for r in kinds] == ["rl"]
