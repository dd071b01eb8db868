"""The console script answers --version and --help without heavy imports."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import inversion_monitor
from inversion_monitor.app.cli import main


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"inversion-monitor {inversion_monitor.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: inversion-monitor" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which(
        "inversion-monitor", path=str(__import__("pathlib").Path(sys.executable).parent)
    )
    assert exe is not None
    out = subprocess.run([exe, "--help"], check=True, capture_output=True, text=True).stdout
    assert "demo" in out
