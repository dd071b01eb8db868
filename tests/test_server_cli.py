"""``inversion-monitor serve`` as a real subprocess, ``runs``, and the server configuration."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from inversion_monitor.app.cli import main
from inversion_monitor.server.config import ServerConfig
from inversion_monitor.server.settings_file import ServerConfigError
from tests.server_support import TIMEOUT, open_run, push, record, running, stub_for

EXE = Path(sys.executable).parent / "inversion-monitor"
ADDRESS_LINE = re.compile(r"^(grpc|http) listening on (\S+)$")


def _start_serve(tmp_path: Path, *extra: str, env: dict[str, str] | None = None):
    proc = subprocess.Popen(
        [
            str(EXE),
            "serve",
            "--grpc-address",
            "127.0.0.1:0",
            "--http-address",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "serve.db"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    addresses = {}
    assert proc.stdout is not None
    for _ in range(2):
        line = proc.stdout.readline().strip()  # blocks until flushed; bounded by 2 lines
        match = ADDRESS_LINE.match(line)
        assert match, f"unexpected line {line!r}; stderr: {proc.stderr.read() if not line else ''}"
        addresses[match.group(1)] = match.group(2)
    page = proc.stdout.readline().strip()
    assert page.startswith(f"live page: {addresses['http']}/"), page
    return proc, addresses


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_bound_addresses_and_stops_cleanly_on_signal(tmp_path, sig):
    proc, addresses = _start_serve(tmp_path, env={"INVERSION_MONITOR_SERVER_TOKEN": "tok"})
    try:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", addresses["grpc"])
        assert not addresses["grpc"].endswith(":0")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", addresses["http"])
        with urllib.request.urlopen(addresses["http"] + "/healthz", timeout=TIMEOUT) as resp:
            assert resp.read() == b"ok\n"
        with urllib.request.urlopen(addresses["http"] + "/", timeout=TIMEOUT) as resp:
            assert b"<title>inversion-monitor</title>" in resp.read()
        with grpc.insecure_channel(addresses["grpc"]) as ch:
            from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc

            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            info = monitor_pb2.RunInfo(run_id="r1", name="via-cli", project="p")
            stub.OpenRun(
                monitor_pb2.OpenRunRequest(run=info),
                timeout=TIMEOUT,
                metadata=[("authorization", "Bearer tok")],
            )
        runs = subprocess.run(
            [str(EXE), "runs", "--endpoint", addresses["grpc"], "--token", "tok"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert runs.returncode == 0, runs.stderr
        assert runs.stdout.splitlines()[0].split() == [
            "NAME",
            "PROJECT",
            "KIND",
            "STATUS",
            "STEP",
            "RHO",
            "ENTROPY",
            "RECORDS",
            "UPDATED",
            "ALERTS",
        ]
        assert runs.stdout.splitlines()[1].split()[:4] == ["via-cli", "p", "-", "running"]
        denied = subprocess.run(
            [str(EXE), "runs", "--endpoint", addresses["grpc"]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_serve_rejects_bad_configuration_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [str(EXE), "serve", "--grpc-address", "nowhere", "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--grpc-address: expected HOST:PORT" in result.stderr
    result = subprocess.run(
        [str(EXE), "serve", "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "INVERSION_MONITOR_SERVER_RETENTION": "soon"},
    )
    assert result.returncode == 2
    assert "INVERSION_MONITOR_SERVER_RETENTION" in result.stderr and "15m" in result.stderr


def test_serve_reports_a_port_in_use(tmp_path):
    with running(tmp_path) as server:
        result = subprocess.run(
            [
                str(EXE),
                "serve",
                "--grpc-address",
                server.grpc_target,
                "--http-address",
                "off",
                "--db",
                str(tmp_path / "other.db"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr


def test_runs_lists_runs_in_process(tmp_path, capsys):
    with running(tmp_path) as server, stub_for(server) as stub:
        assert main(["runs", "--endpoint", server.grpc_target]) == 0
        assert capsys.readouterr().out.strip() == "no runs"
        open_run(stub, "r1", name="first", kind="rl")
        push(stub, record("r1", 1, spearman=-0.25, entropy=1.5))
        assert main(["runs", "--endpoint", server.grpc_target]) == 0
        line = capsys.readouterr().out.splitlines()[1].split()
        assert line[:8] == ["first", "proj", "rl", "running", "10", "-0.250", "1.500", "1"]


def test_help_does_not_import_grpc():
    # pydantic is loaded: `run`'s options are generated from MonitorConfig's fields
    code = (
        "import sys\n"
        "from inversion_monitor.app.cli import build_parser\n"
        "build_parser().format_help()\n"
        "bad = [m for m in ('grpc', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_precedence_flag_over_environment_over_default(tmp_path):
    env = {
        "INVERSION_MONITOR_SERVER_GRPC_ADDRESS": "127.0.0.1:7000",
        "INVERSION_MONITOR_SERVER_DB": str(tmp_path / "env.db"),
        "INVERSION_MONITOR_SERVER_TOKEN": "a,b",
        "INVERSION_MONITOR_SERVER_MAX_RECORDS_PER_PUSH": "50",
    }
    cfg = ServerConfig.from_sources({"grpc_address": "127.0.0.1:0", "tokens": ["c"]}, env)
    assert cfg.grpc_address == "127.0.0.1:0"
    assert cfg.db == tmp_path / "env.db"
    assert cfg.tokens == ("c",)
    assert cfg.limits.max_records_per_push == 50
    assert cfg.http_address == "127.0.0.1:9464" and cfg.retention_s == 3600.0
    assert ServerConfig.from_sources({"http_address": "off"}, {}).http_address is None
    with pytest.raises(ServerConfigError, match="INVERSION_MONITOR_SERVER_MAX_RECORDS_PER_PUSH"):
        ServerConfig.from_sources({}, {"INVERSION_MONITOR_SERVER_MAX_RECORDS_PER_PUSH": "0"})
    with pytest.raises(ServerConfigError, match="--token: a token must be non-empty printable"):
        ServerConfig.from_sources({"tokens": ["has space"]}, {})
    with pytest.raises(ServerConfigError, match=r"port must be 0\.\.65535"):
        ServerConfig.from_sources({"grpc_address": "127.0.0.1:70000"}, {})
