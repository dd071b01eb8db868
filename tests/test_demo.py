"""``inversion-monitor demo`` end to end: the real console script, server, webhook and report.

One short demo run (``--keep-serving``) is shared by the tests: while its
server is still up the tests read the three runs back over ``GetRun`` and
compare them with what the demo printed (and with what its webhook received),
then render its HTML report in headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
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

from inversion_monitor.app.demo import LR_FACTOR, RL_LR, RL_MAX_NEW_TOKENS
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server.api import JSON_HISTORY_SHARE, to_json
from inversion_monitor.server.detectors import AlertsConfig

STEPS = 30
RL_STEPS = 30  # DemoOptions(steps=30).rl_steps
UNSTABLE_STEPS = 50  # DemoOptions(steps=30).unstable_steps
JUMP = AlertsConfig().entropy.warmup + 1  # the destabilised run's learning-rate jump
UNSTABLE = f"demo-rl-lr-x{LR_FACTOR:g}"  # the destabilised run's name
CHROMIUM = "/usr/bin/chromium"
RUN_LINE = re.compile(r"^run (\S+) \(([0-9a-f]+)\), (\w+), (\d+) records stored$", re.M)


@dataclass
class DemoRun:
    out_dir: Path
    stdout: list[str]
    runs: dict[str, monitor_pb2.GetRunResponse]  # by display name
    returncode: int
    seconds_to_serving: float
    page_url: str
    page_html: bytes | None
    api_run: dict[str, object]

    def history(self, name: str) -> list[monitor_pb2.StepRecord]:
        return list(self.runs[name].history)


def _console_script() -> str:
    exe = shutil.which("inversion-monitor", path=str(Path(sys.executable).parent))
    assert exe is not None
    return exe


@contextlib.contextmanager
def _ctrl_c_reaches_children() -> Iterator[None]:
    """Ctrl-C as in a terminal: a suite started in the background (``make test &``) has
    SIGINT ignored, and a child would inherit that; the default comes back after."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    out_dir = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    with _ctrl_c_reaches_children():
        proc = subprocess.Popen(
            [
                _console_script(),
                "demo",
                "--steps",
                str(STEPS),
                "--out",
                str(out_dir),
                "--keep-serving",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = started + 240
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "the server stays up" in line or time.monotonic() > deadline:
                break
        seconds = time.monotonic() - started
        text = "\n".join(lines)
        assert any("the server stays up" in line for line in lines), text
        target = re.search(r"gRPC (\S+),", text)
        page = re.search(r"^live page: (\S+)", text, re.M)
        assert target and page, text
        runs = {}
        with grpc.insecure_channel(target.group(1)) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            for match in RUN_LINE.finditer(text):
                runs[match.group(1)] = stub.GetRun(
                    monitor_pb2.GetRunRequest(run=match.group(2), history_limit=1000), timeout=10
                )
        assert sorted(runs) == ["demo-rl", UNSTABLE, "demo-sft"], text
        with urllib.request.urlopen(page.group(1), timeout=10) as answer:
            page_html = answer.read()
        run_id = runs[UNSTABLE].summary.run.run_id
        api_url = f"{page.group(1)}api/runs/{run_id}?history=1000"
        with urllib.request.urlopen(api_url, timeout=10) as answer:
            api_run = json.loads(answer.read())
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it (Ctrl-C: below)
        rest, _ = proc.communicate(timeout=120)  # a deadline: ~2 s on an idle machine
        lines.extend(rest.splitlines())
        yield DemoRun(
            out_dir,
            lines,
            runs,
            proc.returncode,
            seconds,
            page.group(1),
            page_html,
            api_run,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_demo_exits_cleanly_on_sigterm(demo: DemoRun) -> None:
    assert demo.returncode == 0, "\n".join(demo.stdout)
    assert any("/metrics" in line for line in demo.stdout)
    assert any("SIGTERM: stopping the server" in line for line in demo.stdout)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_keep_serving_wait_ends_on_ctrl_c_and_sigterm(sig: signal.Signals) -> None:
    code = (
        "from inversion_monitor.app.demo import _wait_for_interrupt\n"
        "_wait_for_interrupt('waiting')\n"
        "print('stopped', flush=True)\n"
    )
    with _ctrl_c_reaches_children():
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, bufsize=1
        )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0 and rest.splitlines()[-1] == "stopped", rest


def test_runtime_stays_sane(demo: DemoRun) -> None:
    # all three phases of a 30-step demo, the report included: 32-37 s measured on 2 busy cores
    assert demo.seconds_to_serving < 150, demo.seconds_to_serving
    took = next(line for line in demo.stdout if line.startswith("demo took "))
    assert int(took.split()[2]) <= demo.seconds_to_serving + 1


def test_three_phases_are_announced_in_order(demo: DemoRun) -> None:
    heads = [line for line in demo.stdout if line.startswith("phase ")]
    assert [h.split(":")[0] for h in heads] == [
        "phase 1/3 SFT",
        "phase 2/3 RL",
        "phase 3/3 destabilised RL",
    ]
    too_high = f"{LR_FACTOR:g}x too high ({RL_LR:g} -> {RL_LR * LR_FACTOR:g})"
    assert f"from step {JUMP}" in heads[2] and too_high in heads[2]
    kinds = {name: run.summary.run.kind for name, run in demo.runs.items()}
    assert kinds == {"demo-sft": "sft", "demo-rl": "rl", UNSTABLE: "rl"}
    assert all(run.summary.status == "completed" for run in demo.runs.values())


def test_output_in_a_pipe_is_plain_periodic_lines(demo: DemoRun) -> None:
    assert not any("\x1b" in line or "\r" in line for line in demo.stdout)
    for label, steps in (("sft", STEPS), ("rl", RL_STEPS), ("destabilised rl", UNSTABLE_STEPS)):
        progress = [line for line in demo.stdout if line.startswith(f"{label}: step ")]
        assert 3 <= len(progress) <= 11, progress  # a line per tenth of the run, not per frame
        assert progress[-1].startswith(f"{label}: step {steps}/{steps} (100%)  rho "), progress


def test_the_live_page_url_is_printed_and_serves_the_runs(demo: DemoRun) -> None:
    assert demo.page_url == demo.page_url.split("#")[0] and demo.page_url.endswith("/")
    assert demo.page_html is not None and b"<title>inversion-monitor</title>" in demo.page_html
    expected = to_json(demo.runs[UNSTABLE])
    # the same answer, read under the JSON byte cap (a share of the gRPC one)
    expected["max_bytes"] = str(int(expected["max_bytes"]) // JSON_HISTORY_SHARE)
    assert demo.api_run == expected


def test_the_destabilised_run_is_alerted_within_three_steps_of_the_jump(demo: DemoRun) -> None:
    unstable = demo.runs[UNSTABLE]
    assert unstable.alerts, "\n".join(demo.stdout)
    first = min(unstable.alerts, key=lambda a: a.start_step)
    step = first.start_step
    assert JUMP <= step <= JUMP + 3, unstable.alerts  # after the jump, within 3 steps
    arrived = [
        i for i, line in enumerate(demo.stdout) if line.startswith("ALERT received by the webhook:")
    ]
    assert arrived, "\n".join(demo.stdout)
    head = f"ALERT received by the webhook: {first.name} ({first.severity}) on run {UNSTABLE} "
    after = f"{step - JUMP} step{'' if step - JUMP == 1 else 's'} after"
    tail = f"  [{after} the learning-rate jump at step {JUMP}]"
    lines = [demo.stdout[i] for i in arrived]
    assert any(
        line.startswith(f"{head}at step {step}: ") and line.endswith(tail) for line in lines
    ), lines
    # printed when it arrived: before the summaries read back at the end
    assert arrived[0] < demo.stdout.index("== SFT ==")
    assert (
        f"first alert on {UNSTABLE}: {first.name} at step {step}, {after} "
        f"the learning-rate jump at step {JUMP}"
    ) in demo.stdout
    # the learning rate the records carry: LR_FACTOR times higher from the jump on
    lrs = {rec.step: rec.learning_rate for rec in demo.history(UNSTABLE)}
    assert lrs[JUMP - 1] == pytest.approx(RL_LR)
    assert lrs[JUMP] == pytest.approx(RL_LR * LR_FACTOR)
    # same weights, seed and problems: the runs are the same until the jump changes the update
    before = {r.step: r.reward_mean for r in demo.history("demo-rl") if r.step <= JUMP}
    assert before == {r.step: r.reward_mean for r in demo.history(UNSTABLE) if r.step <= JUMP}
    # the healthy phases raise nothing (SFT: entropy falls because the model learns)
    assert not demo.runs["demo-sft"].alerts
    assert not demo.runs["demo-rl"].alerts


def test_the_destabilised_runs_reward_collapse_is_alerted_within_five_steps(
    demo: DemoRun,
) -> None:
    """The demo's mean reward is noisy (4 problems x 8 samples a step): its fall to ~0 after
    the jump is ~2.5 robust SDs a record, under RewardCollapse's CUSUM allowance, so no alert
    came before; a reward never negative at a quarter of its level three records in a row
    fires, within the reward's budget of 5 records."""
    rewards = {r.step: r.reward_mean for r in demo.history(UNSTABLE)}
    level = sorted(rewards[s] for s in range(1, JUMP + 1))[JUMP // 2]
    collapses = [a for a in demo.runs[UNSTABLE].alerts if a.name == "RewardCollapse"]
    assert collapses, (demo.runs[UNSTABLE].alerts, rewards)
    step = collapses[0].start_step
    assert JUMP < step <= JUMP + 5, (step, rewards)
    assert all(rewards[s] <= 0.25 * level for s in range(step - 2, step + 1)), (level, rewards)


def test_rl_runs_carry_reward_entropy_and_covariance(demo: DemoRun) -> None:
    for name, steps in (("demo-rl", RL_STEPS), (UNSTABLE, UNSTABLE_STEPS)):
        history = sorted(demo.history(name), key=lambda r: r.step)
        assert [r.step for r in history] == list(range(1, steps + 1))  # a record per step
        for rec in history:
            assert math.isfinite(rec.reward_mean) and 0.0 <= rec.reward_mean <= 1.0
            assert math.isfinite(rec.policy_entropy_mean) and rec.policy_entropy_mean >= 0.0
            assert math.isfinite(rec.entropy_covariance)
            # the trainer's health values of every step: loss, lr, pre-clip grad norm, KL, length
            for health in ("loss", "learning_rate", "grad_norm", "kl", "completion_length_mean"):
                assert rec.HasField(health), (name, rec.step, health)
            # a collapsed policy whose samples tie in every group has no gradient at all
            assert (rec.grad_norm > 0.0 or name == UNSTABLE) and rec.grad_norm >= 0.0
            assert rec.kl >= 0.0
            assert 0.0 < rec.completion_length_mean <= RL_MAX_NEW_TOKENS
        # the printed RL lines are the stored records' means over the first and last fifth
        k = max(1, steps // 5)
        start = next(i for i, line in enumerate(demo.stdout) if line.startswith(f"run {name} ("))
        block = demo.stdout[start:]
        for label, field in (
            ("reward mean", "reward_mean"),
            ("Cov(log pi, A)", "entropy_covariance"),
        ):
            first = sum(getattr(r, field) for r in history[:k]) / k
            last = sum(getattr(r, field) for r in history[-k:]) / k
            printed = next(line for line in block if line.startswith(f"{label}: "))
            assert printed.startswith(f"{label}: {first:+.4f} -> {last:+.4f} "), printed
    # the healthy phase's reward rise (or not) is stated under the summaries, from the same records
    history = sorted(demo.history("demo-rl"), key=lambda r: r.step)
    k = RL_STEPS // 5
    first = sum(r.reward_mean for r in history[:k]) / k
    last = sum(r.reward_mean for r in history[-k:]) / k
    verb = "rose" if last > first else "did not rise"
    assert (
        f"healthy RL (demo-rl): mean reward {verb} from {first:.3f} "
        f"(steps 1-{k}) to {last:.3f} (steps {RL_STEPS - k + 1}-{RL_STEPS}), {last - first:+.3f}"
    ) in demo.stdout


def test_sft_summary_numbers_are_the_stored_records(demo: DemoRun) -> None:
    history = demo.history("demo-sft")
    assert len(history) == STEPS  # probes every step for a 30-step run
    by_step = {rec.step: rec for rec in history}
    start = demo.stdout.index("== SFT ==")
    end = demo.stdout.index("== RL ==")
    block = demo.stdout[start:end]
    pattern = re.compile(
        r"^\s+step\s+(\d+)\s+rho ([+-]\d\.\d{3}) \[([+-]\d\.\d\d), ([+-]\d\.\d\d)\]\s+"
        r"entropy (\d+\.\d{3})$"
    )
    printed = [m for m in map(pattern.match, block) if m]
    assert len(printed) >= 2
    for match in printed:
        rec = by_step[int(match.group(1))]
        assert match.group(2) == f"{rec.inversion.spearman.value:+.3f}"
        assert match.group(3) == f"{rec.inversion.spearman.ci_low:+.2f}"
        assert match.group(4) == f"{rec.inversion.spearman.ci_high:+.2f}"
        assert match.group(5) == f"{rec.entropy.mean:.3f}"
    assert int(printed[-1].group(1)) == max(by_step)
    first, last = min(by_step), max(by_step)
    entropy_line = next(line for line in block if line.startswith("entropy mean:"))
    assert entropy_line == (
        f"entropy mean: {by_step[first].entropy.mean:.3f} at step {first} -> "
        f"{by_step[last].entropy.mean:.3f} at step {last}"
    )
    assert "alerts: 0 (none raised)" in block


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_shows_the_phases_the_alert_and_the_signals(demo: DemoRun) -> None:
    from PIL import Image

    page = (demo.out_dir / "report.html").read_text()
    for title in ("Phase 1: SFT", "Phase 2: RL", "Phase 3: destabilised RL"):
        assert title in page
    alert = demo.runs[UNSTABLE].alerts[0]
    assert f"{alert.name} ({alert.severity}) on run {UNSTABLE} at step {alert.start_step}: " in page
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert captions == [
        "rho with its 95% confidence band, per phase",
        "per-token entropy, per phase",
        "reward of the RL phases",
        "Cov(log pi, A) of the RL phases (Cui et al.)",
    ]
    images = _images(page)
    assert len(images) == 4
    for data in images:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width > 200 and image.height > 200
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 10  # not blank
    assert "http://" not in page and "https://" not in page and "<script" not in page


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
    assert 'data-images="4"' in dom.stdout and 'data-broken="0"' in dom.stdout, dom.stdout[:500]
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
