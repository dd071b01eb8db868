"""Reading a settings file (YAML or TOML) and the error every bad server setting raises.

A leaf module: :mod:`.config`, :mod:`.auth` and :mod:`.alert_config` all
read files and raise :class:`ServerConfigError` through it, so none of them
needs another.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "s.toml"
>>> _ = path.write_text("[stale]\\nafter_s = 5\\n")
>>> parse_settings_file(path, "--alerts-config")
{'stale': {'after_s': 5}}
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ServerConfigError(ValueError):
    """A server setting that cannot be used; the message names its flag or variable."""


def parse_settings_file(path: Path, flag: str) -> Any:
    """The contents of a YAML or TOML settings file; errors name ``flag`` and the file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ServerConfigError(f"{flag} {path}: invalid TOML: {exc}") from exc
    if path.suffix.lower() in {".yaml", ".yml"}:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover
            raise ServerConfigError(
                f"{flag} {path}: YAML needs PyYAML (pip install "
                "'inversion-monitor[server]') or use a .toml file"
            ) from exc
        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ServerConfigError(f"{flag} {path}: invalid YAML: {exc}") from exc
    raise ServerConfigError(f"{flag} {path}: use a .yaml, .yml or .toml file")
