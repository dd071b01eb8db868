"""inversion-monitor: a training-health monitor for language models.

The root package exports its public API lazily, so that importing a light
sub-package (``inversion_monitor.server``, ``inversion_monitor.proto``) never
pulls in torch or transformers.

>>> import inversion_monitor
>>> inversion_monitor.__version__  # doctest: +ELLIPSIS
'...'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from inversion_monitor._version import __version__

# public name -> module (relative to this package) that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "DeliveryReport": ".client",
    "MonitorClient": ".client",
    "TelemetryWarning": ".client",
}

if TYPE_CHECKING:  # pragma: no cover - names for type checkers and IDEs only
    from inversion_monitor.client import DeliveryReport, MonitorClient, TelemetryWarning

__all__ = [
    "DeliveryReport",
    "MonitorClient",
    "TelemetryWarning",
    "__version__",
]  # plus sorted(_LAZY_EXPORTS), checked by a test


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'inversion_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
