"""Tokens scoped to projects (read-only / read-write) and secret redaction, on a real server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import pytest

from inversion_monitor.app.cli import main
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.config import ServerConfig
from inversion_monitor.server.settings_file import ServerConfigError
from tests.server_support import (
    TIMEOUT,
    close_run,
    open_run,
    push,
    push_request,
    record,
    rpc_error,
    run_info,
    running,
    scrape_text,
    stub_for,
)

TOKENS_TOML = """
[[tokens]]
token = "team-a-writer"
projects = ["team-a"]

[[tokens]]
token = "team-b-writer"
projects = ["team-b"]
access = "read-write"

[[tokens]]
token = "dashboards"
projects = ["*"]
access = "read-only"

[[tokens]]
token = "team-a-reader"
projects = ["team-a"]
access = "read-only"
"""


def _listed(stub) -> list[str]:  # type: ignore[no-untyped-def]
    response = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
    return sorted(r.display_name for r in response.runs)


def test_tokens_reach_only_their_projects_and_read_only_cannot_write(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens.toml"
    token_file.write_text(TOKENS_TOML)
    with running(tmp_path, token_file=token_file, tokens=["admin"]) as server:
        with stub_for(server, "team-a-writer") as a, stub_for(server, "team-b-writer") as b:
            open_run(a, "run-a", name="a-run", project="team-a")
            open_run(b, "run-b", name="b-run", project="team-b")
            assert push(a, record("run-a", 1)).accepted == 1

            err = rpc_error(
                a.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("run-x", project="team-b"))
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "project 'team-b'" in err.details() and "'team-a'" in err.details()
            # another project's run, claimed under one's own project: the stored project counts
            err = rpc_error(
                a.OpenRun,
                monitor_pb2.OpenRunRequest(
                    run=run_info("run-b", project="team-a"), rank=1, takeover=True
                ),
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED

            assert _listed(a) == ["a-run"] and _listed(b) == ["b-run"]
            err = rpc_error(a.GetRun, monitor_pb2.GetRunRequest(run="b-run"))
            assert err.code() == grpc.StatusCode.NOT_FOUND  # others' runs do not exist
            assert a.GetRun(monitor_pb2.GetRunRequest(run="a-run"), timeout=TIMEOUT).summary

        with stub_for(server, "dashboards") as ro, stub_for(server, "team-a-reader") as ra:
            assert _listed(ro) == ["a-run", "b-run"] and _listed(ra) == ["a-run"]
            got = ro.GetRun(monitor_pb2.GetRunRequest(run="a-run"), timeout=TIMEOUT)
            assert [r.sequence for r in got.history] == [1]
            for stub in (ro, ra):
                err = rpc_error(
                    stub.OpenRun,
                    monitor_pb2.OpenRunRequest(run=run_info("run-r", project="team-a")),
                )
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "read-only" in err.details()
        with stub_for(server, "team-a-writer") as a, stub_for(server, "team-a-reader") as ra:
            open_run(a, "run-a", project="team-a")
            request = push_request(a, record("run-a", 2))
            err = rpc_error(ra.Push, request)  # even with the writer's session
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            close = monitor_pb2.CloseRunRequest(
                run_id="run-a", rank=0, writer_session=request.writer_session
            )
            assert rpc_error(ra.CloseRun, close).code() == grpc.StatusCode.PERMISSION_DENIED
            close_run(a, "run-a")

        with stub_for(server, "admin") as admin:  # --token: every project, read-write
            assert _listed(admin) == ["a-run", "b-run"]
            open_run(admin, "run-b", rank=1, project="team-b")
        with stub_for(server, "nobody") as nobody:
            err = rpc_error(nobody.ListRuns, monitor_pb2.ListRunsRequest())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_file_errors_name_the_flag_the_entry_and_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "tokens.toml"
    bad.write_text('[[tokens]]\ntoken = "t1"\naccess = "write"\n')
    with pytest.raises(ServerConfigError, match=r"--token-file: .*tokens\.0\.access"):
        ServerConfig.from_sources({"token_file": str(bad)}, {})
    bad.write_text('[[tokens]]\ntoken = "has space"\n')
    with pytest.raises(ServerConfigError, match="printable ASCII"):
        ServerConfig.from_sources({"token_file": str(bad)}, {})
    env = {"INVERSION_MONITOR_SERVER_TOKEN_FILE": str(tmp_path / "missing.toml")}
    with pytest.raises(ServerConfigError, match="INVERSION_MONITOR_SERVER_TOKEN_FILE: cannot read"):
        ServerConfig.from_sources({}, env)
    code = main(["serve", "--token-file", str(bad), "--db", str(tmp_path / "m.db")])
    assert code == 2
    assert "--token-file" in capsys.readouterr().err


def test_secret_looking_values_are_redacted_before_storage_and_export(tmp_path: Path) -> None:
    config = {
        "lr": 3e-4,
        "tokens_per_probe": 64,
        "tokenizer": "gpt2",
        "hub": {"hf_token": "abc", "mirror": "https://bob:hunter2@hub.example/x"},
        "note": "key sk-abcdefghijklmnopqrstuvwx",
    }
    labels = {"team": "nlp", "wandb_api_key": "0123456789abcdef", "dbPassword": "p"}
    with running(tmp_path, extended_metrics=True) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="leaky", labels=labels, config_json=json.dumps(config))
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT).runs[0].run
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="leaky"), timeout=TIMEOUT).summary.run
        text = scrape_text(server)
    for info in (listed, got):
        assert dict(info.labels) == {
            "team": "nlp",
            "wandb_api_key": "[redacted]",
            "dbPassword": "[redacted]",
        }
        assert json.loads(info.config_json) == {
            "lr": 3e-4,
            "tokens_per_probe": 64,
            "tokenizer": "gpt2",
            "hub": {"hf_token": "[redacted]", "mirror": "https://bob:[redacted]@hub.example/x"},
            "note": "[redacted]",
        }
    raw = (tmp_path / "monitor.db").read_bytes()
    with sqlite3.connect(tmp_path / "monitor.db") as conn:
        raw += b"".join(row[0] for row in conn.execute("SELECT info FROM runs"))
    for secret in (b"0123456789abcdef", b"hunter2", b"sk-abcdefghij", b'"abc"'):
        assert secret not in raw and secret.decode() not in text
