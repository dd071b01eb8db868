"""Attacks on a real server on loopback (issue 26): each stays fixed.

Every request's CPU, memory and time is bounded, a slow one never stalls the
others, bad input is INVALID_ARGUMENT / 400, and scopes hide other projects.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import MonitorServer
from tests.server_support import (
    TIMEOUT,
    config,
    open_run,
    push,
    record,
    rpc_error,
    run_info,
    running,
    stub_for,
)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------- 1. a config string


def test_a_long_config_value_is_redacted_in_linear_time(tmp_path: Path) -> None:
    # each of these made the backtracking regexes take seconds, with the server frozen
    values = ["a" * 65_000, "x://b:" + "c" * 65_000, "-eyJ" * 16_000]
    with running(tmp_path) as server, stub_for(server) as stub:
        for i, value in enumerate(values):
            info = run_info(f"long{i}", name=f"long {i}", config_json=json.dumps({"v": value}))
            # a deadline far above the milliseconds it takes, far below the seconds it took
            stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=3.0)
        assert _get(server.http_url + "/healthz")[0] == 200
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="long0"), timeout=TIMEOUT)
        assert json.loads(got.summary.run.config_json) == {"v": values[0]}
    # a restart redacts every stored run again: as fast
    start = time.monotonic()
    with running(tmp_path) as server:
        assert len(server.ingestor.views) == len(values)
    assert time.monotonic() - start < 10.0


# ---------------------------------------------------------------- 6. bad input


def test_deeply_nested_config_json_is_invalid_argument(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        for depth in (65, 500, 20_000):
            deep = '{"a": ' + "[" * depth + "]" * depth + "}"
            err = rpc_error(
                stub.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("deep", config_json=deep))
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "config_json" in err.details() and len(err.details()) < 200
        # a config nested a little is fine
        fine = json.dumps({"a": {"b": [[1, 2], {"c": None}]}})
        open_run(stub, "shallow", config_json=fine)


def test_a_non_ascii_digit_in_a_query_is_400(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        for query in ("/api/runs?limit=%C2%B2", "/api/runs/x?history=%D9%A3"):
            status, body = _get(server.http_url + query)
            assert status == 400, (query, body)
            assert json.loads(body)["error"]["code"] == "INVALID_ARGUMENT"


class _Failing:
    """A listener that raises a different error on each record."""

    def __init__(self) -> None:
        self.calls = 0

    def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
        self.calls += 1
        raise (ValueError if self.calls == 1 else KeyError)(f"failure {self.calls}")


def test_every_kind_of_listener_error_is_logged(tmp_path: Path, caplog) -> None:
    server = MonitorServer(config(tmp_path), listeners=[_Failing()]).start()
    try:
        with caplog.at_level(logging.ERROR, "inversion_monitor.server"), stub_for(server) as stub:
            open_run(stub, "r1")
            push(stub, record("r1", 1))
            push(stub, record("r1", 2))
    finally:
        server.stop()
    failed = [r for r in caplog.records if "ingest listener" in r.getMessage()]
    assert [r.exc_info[0] for r in failed if r.exc_info] == [ValueError, KeyError]


# ---------------------------------------------------------------- 7. nested secrets


def test_a_key_naming_a_secret_redacts_its_whole_value(tmp_path: Path) -> None:
    secrets = {
        "db_password": {"prod": "hunter2-prod", "dev": ["hunter2-dev"]},
        "password": 12345678,
        "auth": {"pw": "opensesame"},
        "token_samples": 64,  # an LM setting, not a secret
    }
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "leaky", name="leaky", config_json=json.dumps(secrets))
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="leaky"), timeout=TIMEOUT)
    assert json.loads(got.summary.run.config_json) == {
        "db_password": "[redacted]",
        "password": "[redacted]",
        "auth": "[redacted]",
        "token_samples": 64,
    }
    raw = (tmp_path / "monitor.db").read_bytes()
    for secret in (b"hunter2", b"12345678", b"opensesame"):
        assert secret not in raw


# ---------------------------------------------------------------- 5. names and scopes


def test_a_final_newline_does_not_pass_for_a_valid_name(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("run1\n")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "run_id" in err.details()
        info = run_info("run2", labels={"team\n": "a"})
        err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=info))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels" in err.details()
