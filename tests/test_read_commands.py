"""``runs`` and ``show`` side by side: the same options, the same error sentences."""

from __future__ import annotations

from pathlib import Path

import pytest

from inversion_monitor.app.cli import main
from tests.server_support import free_port, running


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("command", [["runs"], ["show", "r"]])
def test_same_sentences_for_both_commands(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = command[0]
    endpoint = f"127.0.0.1:{free_port()}"
    missing = tmp_path / "ca.pem"
    message = _fails([*command, "--endpoint", endpoint, "--tls-ca", str(missing)], capsys)
    assert message == (
        f"inversion-monitor {name}: --tls-ca file {missing} does not exist: pass the "
        "server's CA file"
    )
    message = _fails([*command, "--endpoint", endpoint, "--timeout", "2"], capsys)
    assert message.startswith(f"inversion-monitor {name}: no monitor server answers at {endpoint}")
    message = _fails([*command, "--endpoint", "http://x:1"], capsys)
    assert "--endpoint 'http://x:1' looks like a URL" in message
    with running(tmp_path, tokens=["tok"]) as server:
        message = _fails([*command, "--endpoint", server.grpc_target], capsys)
        assert "refused the request (UNAUTHENTICATED" in message
        assert "--token or INVERSION_MONITOR_TOKEN" in message
