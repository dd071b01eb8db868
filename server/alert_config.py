"""Loading :class:`~inversion_monitor.server.detectors.AlertsConfig` from YAML or TOML.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "alerts.toml"
>>> _ = path.write_text("[weakening]\\nthreshold = 8\\n")
>>> load_alerts_config(path).weakening.threshold
8.0
>>> load_alerts_config(None).lost.sustain
8
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from inversion_monitor.server.detectors import AlertsConfig
from inversion_monitor.server.settings_file import ServerConfigError, parse_settings_file


def load_alerts_config(path: Path | str | None) -> AlertsConfig:
    """The detector settings in ``path`` (defaults for ``None``), with errors naming the key."""
    if path is None:
        return AlertsConfig()
    path = Path(path)
    try:
        data = parse_settings_file(path, "--alerts-config")
    except OSError as exc:
        raise ServerConfigError(f"--alerts-config {path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ServerConfigError(
            f"--alerts-config {path}: expected a table/mapping at the top level"
        )
    try:
        return AlertsConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ServerConfigError(f"--alerts-config {path}: {problems}") from exc
