"""``inversion-monitor demo`` end to end: the real console script, server, Trainer and report.

One short demo run (``--keep-serving``) is shared by the tests: while its
server is still up the tests read the stored records back over ``GetRun`` and
compare them with what the demo printed, then render its HTML report in
headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server.api import to_json

STEPS = 30
CHROMIUM = "/usr/bin/chromium"


@dataclass
class DemoRun:
    out_dir: Path
    stdout: list[str]
    history: list[monitor_pb2.StepRecord]
    response: monitor_pb2.GetRunResponse
    returncode: int
    page_url: str
    page_html: bytes | None
    api_run: dict[str, object]


def _console_script() -> str:
    exe = shutil.which("inversion-monitor", path=str(Path(sys.executable).parent))
    assert exe is not None
    return exe


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    out_dir = tmp_path_factory.mktemp("demo")
    proc = subprocess.Popen(
        [_console_script(), "demo", "--steps", str(STEPS), "--out", str(out_dir), "--keep-serving"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 150
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "the server stays up" in line or time.monotonic() > deadline:
                break
        assert any("the server stays up" in line for line in lines), "\n".join(lines)
        target = re.search(r"gRPC (\S+),", "\n".join(lines))
        run_id = re.search(r"^run \S+ \(([0-9a-f]+)\)", "\n".join(lines), re.M)
        assert target and run_id, "\n".join(lines)
        page = re.search(r"^live page: (\S+)", "\n".join(lines), re.M)
        assert page, "\n".join(lines)
        with grpc.insecure_channel(target.group(1)) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            response = stub.GetRun(
                monitor_pb2.GetRunRequest(run=run_id.group(1), history_limit=1000), timeout=10
            )
        with urllib.request.urlopen(page.group(1), timeout=10) as answer:
            page_html = answer.read()
        api_url = f"{page.group(1)}api/runs/{run_id.group(1)}?history=1000"
        with urllib.request.urlopen(api_url, timeout=10) as answer:
            api_run = json.loads(answer.read())
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        lines.extend(rest.splitlines())
        yield DemoRun(
            out_dir,
            lines,
            list(response.history),
            response,
            proc.returncode,
            page.group(1),
            page_html,
            api_run,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_demo_exits_cleanly_after_ctrl_c(demo: DemoRun) -> None:
    assert demo.returncode == 0, "\n".join(demo.stdout)
    assert any("/metrics" in line for line in demo.stdout)


def test_output_in_a_pipe_is_plain_periodic_lines(demo: DemoRun) -> None:
    assert not any("\x1b" in line for line in demo.stdout)
    progress = [line for line in demo.stdout if line.startswith("training: step ")]
    assert 3 <= len(progress) <= 11, progress  # a line per tenth of the run, not per frame
    assert progress[-1].startswith(f"training: step {STEPS}/{STEPS} (100%)  rho ")


def test_the_live_page_url_is_printed_and_serves_the_run(demo: DemoRun) -> None:
    assert demo.page_url == demo.page_url.split("#")[0] and demo.page_url.endswith("/")
    assert demo.page_html is not None and b"<title>inversion-monitor</title>" in demo.page_html
    assert demo.api_run == to_json(demo.response)


def test_summary_numbers_are_the_stored_records(demo: DemoRun) -> None:
    assert len(demo.history) == STEPS  # probes every step for a 30-step run
    by_step = {rec.step: rec for rec in demo.history}
    pattern = re.compile(
        r"^\s+step\s+(\d+)\s+rho ([+-]\d\.\d{3}) \[([+-]\d\.\d\d), ([+-]\d\.\d\d)\]\s+"
        r"entropy (\d+\.\d{3})$"
    )
    printed = [m for m in map(pattern.match, demo.stdout) if m]
    assert len(printed) >= 2
    for match in printed:
        rec = by_step[int(match.group(1))]
        assert match.group(2) == f"{rec.inversion.spearman.value:+.3f}"
        assert match.group(3) == f"{rec.inversion.spearman.ci_low:+.2f}"
        assert match.group(4) == f"{rec.inversion.spearman.ci_high:+.2f}"
        assert match.group(5) == f"{rec.entropy.mean:.3f}"
    assert int(printed[-1].group(1)) == max(by_step)
    first, last = min(by_step), max(by_step)
    entropy_line = next(line for line in demo.stdout if line.startswith("entropy mean:"))
    assert entropy_line == (
        f"entropy mean: {by_step[first].entropy.mean:.3f} at step {first} -> "
        f"{by_step[last].entropy.mean:.3f} at step {last}"
    )
    alerts_line = next(line for line in demo.stdout if line.startswith("alerts:"))
    assert alerts_line.startswith(f"alerts: {len(demo.response.alerts)}")
    # an SFT run: entropy falls because the model learns, which raises no alert
    assert demo.response.summary.run.kind == "sft"
    assert not demo.response.alerts


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained_with_its_plots(demo: DemoRun) -> None:
    from PIL import Image

    page = (demo.out_dir / "report.html").read_text()
    images = _images(page)
    assert len(images) == 3  # rho with CI, entropy, scatter at the last probe
    for data in images:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width > 200 and image.height > 200
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 10  # not blank
    assert "http://" not in page and "https://" not in page and "<script" not in page
    last = max(rec.step for rec in demo.history)
    assert f"entropy vs gradient strength at step {last}" in page


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            f"--user-data-dir={user_data}",
            "--window-size=1200,2400",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_report_renders_in_headless_chromium(demo: DemoRun, tmp_path: Path) -> None:
    from PIL import Image

    # a copy of the report that records, after load, how each image decoded
    probe = tmp_path / "probe.html"
    check = (
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "document.body.dataset.images=imgs.length;"
        "document.body.dataset.broken=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length;"
        "});</script>"
    )
    page = (demo.out_dir / "report.html").read_text()
    probe.write_text(page.replace("</body>", check + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), user_data=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="3"' in dom.stdout and 'data-broken="0"' in dom.stdout, dom.stdout[:500]
    assert "Uncaught" not in dom.stderr and ":ERROR:CONSOLE" not in dom.stderr

    shot = tmp_path / "report.png"
    result = _chromium(
        f"--screenshot={shot}",
        (demo.out_dir / "report.html").as_uri(),
        user_data=tmp_path / "profile2",
    )
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1200, 2400)
    assert len(image.convert("RGB").getcolors(1 << 20) or []) > 50  # text and plots drawn
