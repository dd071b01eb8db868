"""The live page: its JSON API against the gRPC answers, its auth, and the page in Chromium.

A real server on loopback, a run streamed with ``MonitorClient``, and the
page driven in Debian's headless Chromium through selenium and Debian's
chromedriver (JavaScript on, nothing downloaded).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import MonitorServer
from inversion_monitor.server.api import JSON_HISTORY_SHARE, to_json
from inversion_monitor.server.config import Limits
from inversion_monitor.telemetry.client import MonitorClient
from tests.server_support import TIMEOUT, open_run, running, stub_for, wait_until

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "page-s3cret"
RUN_ID = "page0run"
# EntropyCollapse fires on the first record below half the early level
ALERTS_TOML = "[entropy]\nwarmup = 3\nsmoothing = 1.0\nsustain = 1\nmax_drop_per_100_steps = 10.0\n"


def _stats(step: int) -> dict[str, Any]:
    rho = -0.4 + 0.3 * math.sin(step / 4)
    entropy = 2.0 if step <= 30 else 0.6
    return {
        "spearman": rho,
        "pearson": rho / 2,
        "n": 256,
        "entropy_mean": entropy,
        "score_mean": 1.5,
        "spearman_ci": (rho - 0.12, rho + 0.12),
        "confidence": 0.95,
        "entropy_p10": entropy / 2,
        "entropy_p50": entropy * 0.9,
        "entropy_p90": entropy * 1.6,
    }


def _log(client: MonitorClient, steps: range) -> None:
    for step in steps:
        client.log(
            step,
            _stats(step),
            loss=3.0 - step / 50,
            entropy_covariance=0.02 * math.cos(step / 3),
            samples=[(1.0, 2.0, 7)] * 4,
        )
    assert client.flush(timeout_s=TIMEOUT)


def _get(
    url: str, token: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _get_run(
    server: MonitorServer, run: str, token: str | None = None
) -> monitor_pb2.GetRunResponse:
    with stub_for(server, token) as stub:
        response: monitor_pb2.GetRunResponse = stub.GetRun(
            monitor_pb2.GetRunRequest(run=run, history_limit=1000), timeout=TIMEOUT
        )
    return response


@pytest.fixture(scope="module")
def streamed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MonitorServer, MonitorClient]]:
    """A server with quick alerts and a run of 24 steps streamed to it (more by the tests)."""
    tmp = tmp_path_factory.mktemp("page")
    alerts = tmp / "alerts.toml"
    alerts.write_text(ALERTS_TOML)
    with running(tmp, alerts_config=alerts) as server:
        client = MonitorClient(
            server.grpc_target, "page demo", project="pages", run_id=RUN_ID, framework="custom"
        )
        _log(client, range(1, 25))
        yield server, client
        client.close(timeout_s=TIMEOUT)


# ---------------------------------------------------------------- the API


def test_api_answers_what_grpc_answers(streamed: tuple[MonitorServer, MonitorClient]) -> None:
    server, _ = streamed
    assert server.http_url is not None
    with stub_for(server) as stub:
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
    status, headers, body = _get(server.http_url + "/api/runs")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == to_json(listed)

    expected = to_json(_get_run(server, RUN_ID))
    # the same answer, read under the JSON byte cap (a share of the gRPC one)
    expected["max_bytes"] = str(int(expected["max_bytes"]) // JSON_HISTORY_SHARE)
    status, _, body = _get(f"{server.http_url}/api/runs/{RUN_ID}?history=1000")
    assert status == 200 and json.loads(body) == expected
    assert len(expected["history"]) == 24 and expected["history"][0]["samples"]
    # by display name too; history= and samples=0 as documented
    status, _, body = _get(server.http_url + "/api/runs/page-demo?history=5&samples=0")
    got = json.loads(body)
    assert status == 200 and [r["step"] for r in got["history"]] == ["20", "21", "22", "23", "24"]
    assert _get(server.http_url + "/api/runs")[1]["X-Max-History"] == "10000"
    assert all(r["samples"] == [] for r in got["history"])
    assert got["summary"] == expected["summary"]


@pytest.mark.parametrize(
    ("path", "method", "status", "code"),
    [
        ("/api/runs/nope", "GET", 404, "NOT_FOUND"),
        ("/api/runs?limit=ten", "GET", 400, "INVALID_ARGUMENT"),
        ("/api/runs?limit=20000", "GET", 400, "INVALID_ARGUMENT"),
        (f"/api/runs/{RUN_ID}?history=99999999", "GET", 400, "INVALID_ARGUMENT"),
        ("/api/runs", "POST", 405, "METHOD_NOT_ALLOWED"),
        ("/api/other", "GET", 404, "NOT_FOUND"),
    ],
)
def test_api_errors_are_json_with_the_reason(
    streamed: tuple[MonitorServer, MonitorClient], path: str, method: str, status: int, code: str
) -> None:
    server, _ = streamed
    got, headers, body = _get(f"{server.http_url}{path}", method=method)
    assert got == status and headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]


def test_static_files_are_served_with_their_types_and_nothing_else(
    streamed: tuple[MonitorServer, MonitorClient],
) -> None:
    server, _ = streamed
    base = server.http_url
    status, headers, body = _get(f"{base}/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert b"static/vendor/uPlot.iife.min.js" in body
    for path, kind in [
        ("/static/page.js", "text/javascript"),
        ("/static/page.css", "text/css"),
        ("/static/vendor/uPlot.iife.min.js", "text/javascript"),
        ("/static/vendor/uPlot.min.css", "text/css"),
        ("/static/vendor/uPlot.LICENSE", "text/plain"),
    ]:
        status, headers, body = _get(base + path)
        assert status == 200 and headers["Content-Type"].startswith(kind), path
        assert body == (ROOT / "server" / path.removeprefix("/")).read_bytes()
    for path in ["/static/../api.py", "/static/vendor/", "/static/nope.js", "/page.py"]:
        assert _get(base + path)[0] == 404, path
    assert _get(f"{base}/", method="POST")[0] == 405
    assert _get(f"{base}/healthz")[2] == b"ok\n"


def test_vendored_files_match_their_recorded_hashes() -> None:
    vendor = ROOT / "server" / "static" / "vendor"
    readme = (vendor / "README.md").read_text()
    recorded = dict(re.findall(r"`(uPlot\.[\w.]+)` ([0-9a-f]{64})", readme))
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css"}
    for name, digest in recorded.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (vendor / "uPlot.LICENSE").read_text()


def test_api_needs_a_token_the_grpc_side_accepts(tmp_path: Path) -> None:
    with running(tmp_path, tokens=[TOKEN, "other"]) as server:
        base = server.http_url
        status, headers, body = _get(f"{base}/api/runs")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "UNAUTHENTICATED"
        assert _get(f"{base}/api/runs", token="wrong")[0] == 401
        assert _get(f"{base}/api/runs/x", token="wrong")[0] == 401  # no hint whether x exists
        assert _get(f"{base}/api/runs", token=TOKEN)[0] == 200
        assert _get(f"{base}/api/runs", token="other")[0] == 200
        # the page itself holds no data and stays open, like /healthz
        assert _get(f"{base}/")[0] == 200


# ---------------------------------------------------------------- the page in Chromium


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _row(driver: webdriver.Chrome, run_id: str) -> dict[str, str]:
    """The run's table row as ``field -> shown text``, read at once (the table is redrawn)."""
    row: dict[str, str] = driver.execute_script(
        """
        const row = [...document.querySelectorAll("tr[data-run-id]")]
          .find((tr) => tr.dataset.runId === arguments[0]);
        if (!row) return {};
        return Object.fromEntries([...row.cells].map((td) => [td.dataset.field, td.innerText]));
        """,
        run_id,
    )
    return row


def _severe(driver: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# Non-blank pixels of each chart's canvas, and the data uPlot holds.
_CHARTS_JS = """
const out = {};
for (const [key, chart] of Object.entries(window.inversionMonitorPage.charts)) {
  const canvas = chart.box.querySelector("canvas");
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let drawn = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) drawn++;
  out[key] = {drawn, width: canvas.width, data: chart.plot.data};
}
return out;
"""


def _assert_charts_show(charts: dict[str, Any], response: monitor_pb2.GetRunResponse) -> None:
    """The charts hold exactly the history of ``GetRun``: steps, rho and CI, entropy, ..."""
    assert set(charts) == {"rho", "entropy", "covariance", "loss"}
    history = list(response.history)
    steps = [float(r.step) for r in history]
    expected = {
        "rho": [
            [r.inversion.spearman.value for r in history],
            [r.inversion.spearman.ci_high for r in history],
            [r.inversion.spearman.ci_low for r in history],
        ],
        "entropy": [
            [getattr(r.entropy, q) for r in history] for q in ("mean", "p90", "p50", "p10")
        ],
        "covariance": [[r.entropy_covariance for r in history]],
        "loss": [[r.loss for r in history]],
    }
    for key, columns in expected.items():
        data = charts[key]["data"]
        assert data[0] == steps, key
        assert len(data) == len(columns) + 1, key
        for got, want in zip(data[1:], columns, strict=True):
            assert got == pytest.approx(want), key


def _sign(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def test_page_lists_the_streamed_run_draws_it_live_and_matches_getrun(
    streamed: tuple[MonitorServer, MonitorClient], browser: webdriver.Chrome
) -> None:
    server, client = streamed
    assert server.page_url is not None
    _log(client, range(25, 41))  # entropy falls below half its early level: an alert
    browser.get(server.page_url)
    wait_until("the run's row at step 40", lambda: _row(browser, RUN_ID).get("step") == "40")
    wait_until("the charts", lambda: len(browser.execute_script(_CHARTS_JS)) == 4)

    response = _get_run(server, RUN_ID)
    summary, latest = response.summary, response.summary.latest
    row = _row(browser, RUN_ID)
    spearman = latest.inversion.spearman
    assert row == {
        "name": "page-demo",
        "project": "pages",
        "kind": "–",
        "status": "running",
        "step": "40",
        "rho": _sign(spearman.value, 3),
        "ci": f"[{_sign(spearman.ci_low, 2)}, {_sign(spearman.ci_high, 2)}]",
        "entropy": f"{latest.entropy.mean:.3f}",
        "records": str(summary.records),
        "updated": row["updated"],
        "alerts": ",".join(a.name for a in summary.active_alerts),
    }
    assert re.fullmatch(r"\d+s ago", row["updated"])
    assert [a.name for a in summary.active_alerts] == ["EntropyCollapse"]
    alert_lines = browser.find_element(By.ID, "run-alerts").text
    assert f"EntropyCollapse (warning) since step {response.alerts[0].start_step}" in alert_lines

    charts = browser.execute_script(_CHARTS_JS)
    _assert_charts_show(charts, response)
    for chart in charts.values():
        # lines, bands and axes drawn: a blank canvas has no opaque pixel
        assert chart["width"] > 300 and chart["drawn"] > chart["width"] * 5

    # live: more records appear without a reload, fetched alone (5 new + a margin of 10)
    _log(client, range(41, 46))
    wait_until("step 45 on the page", lambda: _row(browser, RUN_ID).get("step") == "45")
    wait_until(
        "45 points in the rho chart",
        lambda: len(browser.execute_script(_CHARTS_JS)["rho"]["data"][0]) == 45,
    )
    _assert_charts_show(browser.execute_script(_CHARTS_JS), _get_run(server, RUN_ID))
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert any(url.endswith(f"/api/runs/{RUN_ID}?history=15&samples=0") for url in fetched)
    assert browser.execute_script("return window.inversionMonitorPage.error") is None
    assert _severe(browser) == []
    shot = Path(server.config.db).parent / "page.png"  # for a person to look at
    assert browser.save_screenshot(str(shot))


def test_page_asks_for_a_token_and_takes_one_from_the_fragment(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with running(tmp_path, tokens=[TOKEN]) as server:
        assert server.page_url is not None
        with MonitorClient(
            server.grpc_target, "secret run", run_id="tokrun", token=TOKEN
        ) as client:
            _log(client, range(1, 4))
        # no token: the page asks for one
        browser.get(server.page_url)
        form = browser.find_element(By.ID, "token-form")
        wait_until("the token form", form.is_displayed)
        assert browser.find_elements(By.CSS_SELECTOR, "tr[data-run-id]") == []
        # every console error is the API's 401 the form answers
        errors = _severe(browser)
        assert errors and all("401" in e and "/api/runs" in e for e in errors), errors
        # typed in
        browser.find_element(By.ID, "token-input").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait_until(
            "the run after typing the token",
            lambda: _row(browser, "tokrun").get("step") == "3",
        )
        assert not form.is_displayed()
        # from the URL fragment, in a tab that has no token yet
        browser.execute_script("sessionStorage.clear()")
        browser.get("about:blank")
        browser.get(f"{server.page_url}#token={TOKEN}&run=tokrun")
        wait_until("the run from the fragment's token", lambda: _row(browser, "tokrun").get("step"))
        assert TOKEN not in browser.current_url  # kept out of the address bar
        assert browser.current_url.endswith("#run=tokrun")
        assert _severe(browser) == []


def test_page_asks_for_no_more_history_than_the_server_gives(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with running(tmp_path, limits=Limits(max_history=20)) as server:
        assert server.page_url is not None
        with MonitorClient(server.grpc_target, "long run", run_id="longrun") as client:
            _log(client, range(1, 31))
        browser.get(server.page_url)
        wait_until("the run at step 30", lambda: _row(browser, "longrun").get("step") == "30")
        charts = wait_until("the charts", lambda: browser.execute_script(_CHARTS_JS))
        assert charts["rho"]["data"][0] == list(range(11, 31))  # the latest 20
        assert browser.execute_script("return window.inversionMonitorPage.error") is None
        assert _severe(browser) == []


def test_page_shows_a_run_without_records_yet_and_switches_runs_on_a_click(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        assert server.page_url is not None
        with MonitorClient(server.grpc_target, "older run", run_id="olderrun") as client:
            _log(client, range(1, 6))
        open_run(stub, "emptyrun", name="just opened")
        browser.get(server.page_url)
        wait_until("the empty run", lambda: _row(browser, "emptyrun").get("status") == "running")
        row = _row(browser, "emptyrun")
        assert (row["step"], row["rho"], row["records"]) == ("–", "–", "0")
        wait_until(
            "a refresh",
            lambda: browser.execute_script("return window.inversionMonitorPage.refreshes") >= 2,
        )
        assert browser.find_element(By.ID, "run-title").text == "just-opened"  # the newest
        # found and clicked at once: the table is redrawn every refresh
        browser.execute_script("document.querySelector('tr[data-run-id=\"olderrun\"]').click()")
        wait_until(
            "the clicked run's charts",
            lambda: (
                len(browser.execute_script(_CHARTS_JS).get("rho", {}).get("data", [[]])[0]) == 5
            ),
        )
        assert browser.find_element(By.ID, "run-title").text == "older-run"
        assert browser.current_url.endswith("#run=olderrun")
        assert browser.execute_script("return window.inversionMonitorPage.error") is None
        assert _severe(browser) == []


def test_page_draws_the_health_charts_and_marks_a_health_alert(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    """Records carrying grad norm, KL and completion length get a chart each; the
    GradNormSpike the server raises on the jump's second record (two in a row: a lone
    record does not fire it) is listed and marked on the charts."""
    from tests.server_support import push, record

    jump = 30
    with running(tmp_path) as server, stub_for(server) as stub:
        assert server.page_url is not None
        open_run(stub, "healthrun", name="health run", kind="rl")
        records = [
            record(
                "healthrun",
                step,
                step=step,
                grad_norm=(1.0 + 0.05 * math.sin(step)) * (40.0 if step >= jump else 1.0),
                kl=0.02 + 0.002 * math.cos(step),
                completion_length_mean=40.0 + 2.0 * math.sin(step / 2),
            )
            for step in range(1, 41)
        ]
        assert not push(stub, *records).rejected
        browser.get(f"{server.page_url}#run=healthrun")
        charts = wait_until(
            "the health charts",
            lambda: (
                (c := browser.execute_script(_CHARTS_JS))
                and {"grad-norm", "kl", "length"} <= set(c)
                and c
            ),
        )
        history = list(_get_run(server, "healthrun").history)
        assert charts["grad-norm"]["data"][1] == pytest.approx([r.grad_norm for r in history])
        assert charts["kl"]["data"][1] == pytest.approx([r.kl for r in history])
        assert charts["length"]["data"][1] == pytest.approx(
            [r.completion_length_mean for r in history]
        )
        lines = wait_until(
            "the alert line",
            lambda: "GradNormSpike" in (t := browser.find_element(By.ID, "run-alerts").text) and t,
        )
        assert f"GradNormSpike (warning) since step {jump + 1}" in lines
        # the mark: a dashed vertical line where it started, in the alert colour (#d08000)
        marked = browser.execute_script(
            """
            const chart = window.inversionMonitorPage.charts["kl"].plot;
            const x = Math.round(chart.valToPos(arguments[0], "x", true));
            const ctx = chart.ctx, top = chart.bbox.top, h = chart.bbox.height;
            let hits = 0;
            for (let y = top; y < top + h; y += 2) {
              const [r, g, b] = ctx.getImageData(x, y, 1, 1).data;
              if (r > 180 && g > 100 && g < 160 && b < 60) hits++;
            }
            return hits;
            """,
            jump + 1,
        )
        assert marked > 10
        assert _severe(browser) == []
