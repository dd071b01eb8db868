"""Alert detectors over a run's stream of records: pure state machines, no I/O.

One module per detector family (:mod:`.inversion`, :mod:`.entropy`,
:mod:`.stale`), the shared vocabulary in :mod:`.base`, every setting in
:mod:`.config` and the per-run bundle in :mod:`.run`.

Each detector is fed :class:`Observation` values (one per record of the run's
driving rank, in step order) and returns a :class:`Transition` when its alert
starts or ends, ``None`` otherwise. The numbers that decided it travel in
``Transition.values`` and in the message.

- :class:`InversionWeakening` (warning): one-sided CUSUM on the Fisher z of
  Spearman rho, standardised by its standard error sqrt(1.06/(n-3)), against
  the run's own level measured over a warm-up.
- :class:`InversionLost` (critical): the established inversion is gone: the
  upper confidence bound of rho is at or above 0 for ``sustain`` records.
- :class:`EntropyCollapse` (warning): smoothed mean entropy below a fraction
  of its early level, or falling faster than a rate.
- :class:`EntropyExhaustion` (warning, RL runs): the entropy-performance law
  R = -a e^H + b fitted to the run (:mod:`.entropy_law`) says most of its reward
  gain is used (``progress``) while policy entropy keeps falling: the reward
  ceiling is near, before the reward curve shows it.
- :class:`MonitorStale` (warning): an open run silent for ``after_s`` seconds
  (evaluated on a timer with :meth:`MonitorStale.check`).

Detectors know the run kind (``sft``, ``rl``, ``custom``, or empty when the
client did not say): :class:`EntropyCollapse` judges only the kinds in its
``kinds`` setting (not SFT by default: entropy falls there because the model
learns), :class:`EntropyExhaustion` only RL runs (and runs of unknown kind
that send rewards).
"""

from __future__ import annotations

from inversion_monitor.server.detectors.base import (
    Z_95,
    AlertName,
    DetectorConfig,
    Observation,
    Reason,
    Severity,
    Transition,
)
from inversion_monitor.server.detectors.config import AlertsConfig
from inversion_monitor.server.detectors.entropy import (
    EntropyCollapse,
    EntropyConfig,
    EntropyExhaustion,
    ExhaustionConfig,
)
from inversion_monitor.server.detectors.inversion import (
    InversionLost,
    InversionWeakening,
    LostConfig,
    WeakeningConfig,
)
from inversion_monitor.server.detectors.run import RunDetectors
from inversion_monitor.server.detectors.stale import MonitorStale, StaleConfig

__all__ = [
    "Z_95",
    "AlertName",
    "AlertsConfig",
    "DetectorConfig",
    "EntropyCollapse",
    "EntropyConfig",
    "EntropyExhaustion",
    "ExhaustionConfig",
    "InversionLost",
    "InversionWeakening",
    "LostConfig",
    "MonitorStale",
    "Observation",
    "Reason",
    "RunDetectors",
    "Severity",
    "StaleConfig",
    "Transition",
    "WeakeningConfig",
]
