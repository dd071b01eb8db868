"""``inversion-monitor run -- COMMAND``: unmodified scripts get the monitor attached."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from inversion_monitor.proto.v1 import monitor_pb2
from tests.server_support import free_port, running, stub_for

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "inversion-monitor")


def run(args: list[str], *, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [EXE, "run", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def history(server, run_name: str):
    with stub_for(server) as stub:
        return stub.GetRun(monitor_pb2.GetRunRequest(run=run_name, history_limit=100), timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "callback"),
    [
        ("plain_hf_train.py", ["{out}", "4"], "InversionTrainerCallback"),
        ("plain_lightning_train.py", ["4"], "InversionLightningCallback"),
    ],
)
def test_unmodified_script_sends_records(tmp_path, script, args, callback):
    with running(tmp_path) as server:
        proc = run(
            [
                "--endpoint",
                server.grpc_target,
                "--run-name",
                "zero-code",
                "--every-n-steps",
                "2",
                "--",
                sys.executable,
                str(FIXTURES / script),
                *(a.format(out=tmp_path / "out") for a in args),
            ],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reply = history(server, "zero-code")
    assert [r.step for r in reply.history] == [1, 2, 3, 4]  # one health record a step
    assert [r.step for r in reply.history if r.HasField("inversion")] == [2, 4]
    assert proc.stderr.count("inversion-monitor: attached to") == 1
    assert f"sending to {server.grpc_target}" in proc.stderr
    assert proc.stdout.count(callback) == 1  # added exactly once


@pytest.mark.slow
def test_torchrun_workers_are_all_instrumented(tmp_path):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    with running(tmp_path) as server:
        proc = run(
            [
                "--endpoint",
                server.grpc_target,
                "--run-name",
                "ddp-zero",
                "--every-n-steps",
                "1",
                "--",
                *torchrun,
                str(FIXTURES / "plain_hf_train.py"),
                str(tmp_path / "out"),
                "3",
            ]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reply = history(server, "ddp-zero")
    assert sorted((r.rank, r.step) for r in reply.history) == [
        (rank, step) for rank in (0, 1) for step in (1, 2, 3)
    ]
    assert proc.stderr.count("inversion-monitor: attached to") == 1  # rank 0 announces


def test_user_added_callback_is_not_added_twice(tmp_path):
    proc = run(
        [
            "--jsonl-path",
            str(tmp_path / "r.jsonl"),
            "--",
            sys.executable,
            str(FIXTURES / "hf_ddp_train.py"),
            str(tmp_path / "out"),
            "2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attached to" not in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2]


def test_programs_without_trainers_are_untouched():
    code = (
        "import sys, json; print(json.dumps("
        "[m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]))"
    )
    proc = run(["--", sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert proc.stderr == ""


def test_exit_code_and_output_pass_through():
    proc = run(
        [
            "--",
            sys.executable,
            "-c",
            "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
        ],
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def test_disabled_by_environment(tmp_path):
    proc = run(
        [
            "--jsonl-path",
            str(tmp_path / "r.jsonl"),
            "--",
            sys.executable,
            str(FIXTURES / "plain_hf_train.py"),
            str(tmp_path / "out"),
            "1",
        ],
        INVERSION_MONITOR_DISABLED="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attached to" not in proc.stderr
    assert "InversionTrainerCallback" not in proc.stdout


def test_sigterm_reaches_the_child():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), "
        "sys.exit(7)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [EXE, "run", "--", sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7 and out == "got TERM\n"


def test_killed_child_reports_128_plus_signal():
    proc = run(
        ["--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 9)"], timeout=60
    )
    assert proc.returncode == 137


def test_missing_command_and_unknown_program():
    assert run([], timeout=30).returncode == 2
    proc = run(["--", "no-such-program-xyz"], timeout=30)
    assert proc.returncode == 127 and "command not found" in proc.stderr
    assert shutil.which(EXE)


def test_options_are_generated_from_every_config_field():
    from inversion_monitor.app.cli import main  # noqa: F401 - the parser is built there
    from inversion_monitor.config import MonitorConfig

    proc = subprocess.run(
        [EXE, "run", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0
    for field in MonitorConfig.model_fields:
        if field != "disabled":
            assert "--" + field.replace("_", "-") in proc.stdout, field
    assert "(default: 0.03)" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--overhead-budget", "2"],
            {},
            "--overhead-budget: Input should be less than 1 (got '2')",
        ),
        (["--tokens-per-probe", "many"], {}, "--tokens-per-probe: Input should be a valid integer"),
        (["--norm", "spectral"], {}, "--norm: Input should be 'nuclear', 'frobenius' or 'l1'"),
        (
            [],
            {"INVERSION_MONITOR_EVERY_N_STEPS": "0"},
            "the variable INVERSION_MONITOR_EVERY_N_STEPS",
        ),
    ],
)
def test_bad_options_are_refused_before_the_child_starts(tmp_path, args, env, message):
    marker = tmp_path / "child-ran"
    proc = run(
        [*args, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
        timeout=60,
        **env,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1  # one sentence, no traceback
    assert not marker.exists()


def test_boolean_options_reach_the_child_as_flags(tmp_path):
    from inversion_monitor.app.cli import build_parser
    from inversion_monitor.app.run_command import child_environment

    args = build_parser().parse_args(["run", "--per-token-type", "--no-log-to-trainer", "--", "x"])
    env = child_environment(args, {})
    assert env["INVERSION_MONITOR_PER_TOKEN_TYPE"] == "1"
    assert env["INVERSION_MONITOR_LOG_TO_TRAINER"] == "0"
