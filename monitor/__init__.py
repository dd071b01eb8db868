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
    "ArchitectureAdapter": ".probe.architectures",
    "DegenerateInputWarning": ".metrics.stats",
    "DeliveryReport": ".telemetry.window",
    "InversionAccumulator": ".metrics.stats",
    "InversionMonitor": ".engine.training_monitor",
    "InversionStats": ".metrics.stats",
    "MonitorClient": ".telemetry.client",
    "MonitorConfig": ".config",
    "MonitorWarning": ".engine.training_monitor",
    "ProbeResult": ".probe.gradients",
    "ProjectionSite": ".probe.architectures",
    "SequenceInversion": ".rl.corrpo",
    "TelemetryWarning": ".telemetry.sender",
    "TokenSampler": ".probe.sampling",
    "corrpo_rewards": ".rl.corrpo",
    "entropy_covariance": ".metrics.covariance",
    "entropy_covariance_per_token": ".metrics.covariance",
    "entropy_from_hidden": ".metrics.entropy",
    "fisher_ci": ".metrics.correlation",
    "group_advantages": ".rl.corrpo",
    "inversion_stats": ".metrics.stats",
    "logit_gradient_norms": ".probe.gradients",
    "pearson": ".metrics.correlation",
    "rank_average": ".metrics.correlation",
    "reference_norms": ".probe.reference",
    "register_adapter": ".probe.architectures",
    "sequence_inversion": ".rl.corrpo",
    "spearman": ".metrics.correlation",
    "token_entropy": ".metrics.entropy",
    "valid_positions": ".probe.sampling",
}

if TYPE_CHECKING:  # pragma: no cover - names for type checkers and IDEs only
    from inversion_monitor.config import MonitorConfig
    from inversion_monitor.engine.training_monitor import InversionMonitor, MonitorWarning
    from inversion_monitor.metrics.correlation import fisher_ci, pearson, rank_average, spearman
    from inversion_monitor.metrics.covariance import (
        entropy_covariance,
        entropy_covariance_per_token,
    )
    from inversion_monitor.metrics.entropy import entropy_from_hidden, token_entropy
    from inversion_monitor.metrics.stats import (
        DegenerateInputWarning,
        InversionAccumulator,
        InversionStats,
        inversion_stats,
    )
    from inversion_monitor.probe.architectures import (
        ArchitectureAdapter,
        ProjectionSite,
        register_adapter,
    )
    from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
    from inversion_monitor.probe.reference import reference_norms
    from inversion_monitor.probe.sampling import TokenSampler, valid_positions
    from inversion_monitor.rl.corrpo import (
        SequenceInversion,
        corrpo_rewards,
        group_advantages,
        sequence_inversion,
    )
    from inversion_monitor.telemetry.client import MonitorClient
    from inversion_monitor.telemetry.sender import TelemetryWarning
    from inversion_monitor.telemetry.window import DeliveryReport

# "__version__" first, then sorted(_LAZY_EXPORTS): checked by tests/test_exports.py
__all__ = [  # noqa: RUF022 - the order above is the contract
    "__version__",
    "ArchitectureAdapter",
    "DegenerateInputWarning",
    "DeliveryReport",
    "InversionAccumulator",
    "InversionMonitor",
    "InversionStats",
    "MonitorClient",
    "MonitorConfig",
    "MonitorWarning",
    "ProbeResult",
    "ProjectionSite",
    "SequenceInversion",
    "TelemetryWarning",
    "TokenSampler",
    "corrpo_rewards",
    "entropy_covariance",
    "entropy_covariance_per_token",
    "entropy_from_hidden",
    "fisher_ci",
    "group_advantages",
    "inversion_stats",
    "logit_gradient_norms",
    "pearson",
    "rank_average",
    "reference_norms",
    "register_adapter",
    "sequence_inversion",
    "spearman",
    "token_entropy",
    "valid_positions",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'inversion_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
