"""deploy/prometheus: rules pass `promtool check rules` and their unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PROM = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_check() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 31 rules found" in result.stdout


def test_rules_unit_tests() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_check() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests would fail if the staleness limit changed."""
    text = (PROM / "rules.yml").read_text().replace("> 900", "> 9000")
    (tmp_path / "rules.yml").write_text(text)
    shutil.copy(PROM / "rules_test.yml", tmp_path / "rules_test.yml")
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "InversionMonitorStale" in result.stdout + result.stderr


def test_unit_tests_catch_a_blind_divergence_rule(tmp_path: Path) -> None:
    """The unit tests would fail if NonFiniteTrainingValues stopped seeing a NaN grad norm."""
    text = (PROM / "rules.yml").read_text()
    broken = text.replace(
        "(inversion_monitor_grad_norm != inversion_monitor_grad_norm)",
        "(inversion_monitor_grad_norm > 1e9)",
    )
    assert broken != text
    (tmp_path / "rules.yml").write_text(broken)
    shutil.copy(PROM / "rules_test.yml", tmp_path / "rules_test.yml")
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "NonFiniteTrainingValues" in result.stdout + result.stderr
