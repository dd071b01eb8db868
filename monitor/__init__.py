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
    "ArchitectureAdapter": ".architectures",
    "DegenerateInputWarning": ".stats",
    "DeliveryReport": ".window",
    "InversionAccumulator": ".stats",
    "InversionMonitor": ".monitor",
    "InversionStats": ".stats",
    "MonitorClient": ".client",
    "MonitorConfig": ".config",
    "MonitorWarning": ".monitor",
    "ProbeResult": ".probe",
    "ProjectionSite": ".architectures",
    "SequenceInversion": ".corrpo",
    "TelemetryWarning": ".sender",
    "TokenSampler": ".sampling",
    "corrpo_rewards": ".corrpo",
    "entropy_covariance": ".covariance",
    "entropy_covariance_per_token": ".covariance",
    "entropy_from_hidden": ".entropy",
    "fisher_ci": ".stats",
    "group_advantages": ".corrpo",
    "inversion_stats": ".stats",
    "logit_gradient_norms": ".probe",
    "pearson": ".stats",
    "rank_average": ".stats",
    "reference_norms": ".reference",
    "register_adapter": ".architectures",
    "sequence_inversion": ".corrpo",
    "spearman": ".stats",
    "token_entropy": ".entropy",
    "valid_positions": ".sampling",
}

if TYPE_CHECKING:  # pragma: no cover - names for type checkers and IDEs only
    from inversion_monitor.architectures import (
        ArchitectureAdapter,
        ProjectionSite,
        register_adapter,
    )
    from inversion_monitor.client import MonitorClient
    from inversion_monitor.config import MonitorConfig
    from inversion_monitor.corrpo import (
        SequenceInversion,
        corrpo_rewards,
        group_advantages,
        sequence_inversion,
    )
    from inversion_monitor.covariance import entropy_covariance, entropy_covariance_per_token
    from inversion_monitor.entropy import entropy_from_hidden, token_entropy
    from inversion_monitor.monitor import InversionMonitor, MonitorWarning
    from inversion_monitor.probe import ProbeResult, logit_gradient_norms
    from inversion_monitor.reference import reference_norms
    from inversion_monitor.sampling import TokenSampler, valid_positions
    from inversion_monitor.sender import TelemetryWarning
    from inversion_monitor.stats import (
        DegenerateInputWarning,
        InversionAccumulator,
        InversionStats,
        fisher_ci,
        inversion_stats,
        pearson,
        rank_average,
        spearman,
    )
    from inversion_monitor.window import DeliveryReport

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
