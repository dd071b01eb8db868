"""The monitor server: ingests records over gRPC, stores them, exports metrics.

Never imports torch, transformers or lightning, so it starts in well under a
second. Public names load lazily, so ``inversion-monitor --help`` stays free
of gRPC imports.

>>> from inversion_monitor.server import MonitorServer, ServerConfig
>>> cfg = ServerConfig(grpc_address="127.0.0.1:0", http_address=None, db=":memory:")
>>> with MonitorServer(cfg) as server:
...     server.grpc_port > 0
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module (relative to this package) that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "AsyncMonitorServer": ".app",
    "MonitorServer": ".app",
    "ServerConfig": ".config",
    "Limits": ".config",
    "ServerConfigError": ".settings_file",
    "IngestListener": ".listeners",
    "RunListener": ".listeners",
    "AlertEngine": ".alerts",
    "AlertmanagerSink": ".alertmanager",
    "AlertsConfig": ".detectors",
    "load_alerts_config": ".alert_config",
}

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.server.alert_config import load_alerts_config
    from inversion_monitor.server.alertmanager import AlertmanagerSink
    from inversion_monitor.server.alerts import AlertEngine
    from inversion_monitor.server.app import AsyncMonitorServer, MonitorServer
    from inversion_monitor.server.config import Limits, ServerConfig
    from inversion_monitor.server.detectors import AlertsConfig
    from inversion_monitor.server.listeners import IngestListener, RunListener
    from inversion_monitor.server.settings_file import ServerConfigError

__all__ = [
    "AlertEngine",
    "AlertmanagerSink",
    "AlertsConfig",
    "AsyncMonitorServer",
    "IngestListener",
    "Limits",
    "MonitorServer",
    "RunListener",
    "ServerConfig",
    "ServerConfigError",
    "load_alerts_config",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'inversion_monitor.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
