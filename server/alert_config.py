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

import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from inversion_monitor.server.config import ConfigError
from inversion_monitor.server.detectors import AlertsConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_settings_file(path: Path, flag: str) -> Any:
    """The contents of a YAML or TOML settings file; errors name ``flag`` and the file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{flag} {path}: invalid TOML: {exc}") from exc
    if path.suffix.lower() in {".yaml", ".yml"}:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover
            raise ConfigError(
                f"{flag} {path}: YAML needs PyYAML (pip install "
                "'inversion-monitor[server]') or use a .toml file"
            ) from exc
        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {path}: invalid YAML: {exc}") from exc
    raise ConfigError(f"{flag} {path}: use a .yaml, .yml or .toml file")


def load_alerts_config(path: Path | str | None) -> AlertsConfig:
    """The detector settings in ``path`` (defaults for ``None``), with errors naming the key."""
    if path is None:
        return AlertsConfig()
    path = Path(path)
    try:
        data = parse_settings_file(path, "--alerts-config")
    except OSError as exc:
        raise ConfigError(f"--alerts-config {path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--alerts-config {path}: expected a table/mapping at the top level")
    try:
        return AlertsConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"--alerts-config {path}: {problems}") from exc
