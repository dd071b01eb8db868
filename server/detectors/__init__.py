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

Training health (one record per optimizer step), self-calibrating per run
(:mod:`.robust`: robust z-scores of the run's own values against the median and
MAD of its recent records, two-sided CUSUM; nothing to set):

- :class:`NonFiniteTraining` (critical): a NaN or infinite loss, grad norm or
  reward, on that very record (:mod:`.nonfinite`).
- :class:`LossSpike`, :class:`GradNormSpike`, :class:`KLSurge` (warning): the
  value jumps above the run's level (:mod:`.spikes`).
- :class:`RewardCollapse` (warning, RL): the mean reward falls below its level
  (:mod:`.reward`).
- :class:`EntropySurge` (warning): entropy jumps above its level; the sudden fall
  is :class:`EntropyCollapse`'s fast path (:mod:`.entropy`).
- :class:`LengthDrift` (warning, RL): the mean completion length runs away or
  collapses (:mod:`.length`).

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
    EntropyDropConfig,
    EntropyExhaustion,
    EntropySurge,
    EntropySurgeConfig,
    ExhaustionConfig,
)
from inversion_monitor.server.detectors.inversion import (
    InversionLost,
    InversionWeakening,
    LostConfig,
    WeakeningConfig,
)
from inversion_monitor.server.detectors.length import LengthDrift, LengthDriftConfig
from inversion_monitor.server.detectors.nonfinite import NonFiniteConfig, NonFiniteTraining
from inversion_monitor.server.detectors.reward import RewardCollapse, RewardCollapseConfig
from inversion_monitor.server.detectors.robust import (
    Direction,
    DriftConfig,
    DriftDetector,
    RobustStream,
    Scale,
)
from inversion_monitor.server.detectors.run import RecordDetector, RunDetectors
from inversion_monitor.server.detectors.spikes import (
    GradNormSpike,
    GradNormSpikeConfig,
    KLSurge,
    KLSurgeConfig,
    LossSpike,
    LossSpikeConfig,
)
from inversion_monitor.server.detectors.stale import MonitorStale, StaleConfig

__all__ = [
    "Z_95",
    "AlertName",
    "AlertsConfig",
    "DetectorConfig",
    "Direction",
    "DriftConfig",
    "DriftDetector",
    "EntropyCollapse",
    "EntropyConfig",
    "EntropyDropConfig",
    "EntropyExhaustion",
    "EntropySurge",
    "EntropySurgeConfig",
    "ExhaustionConfig",
    "GradNormSpike",
    "GradNormSpikeConfig",
    "InversionLost",
    "InversionWeakening",
    "KLSurge",
    "KLSurgeConfig",
    "LengthDrift",
    "LengthDriftConfig",
    "LossSpike",
    "LossSpikeConfig",
    "LostConfig",
    "MonitorStale",
    "NonFiniteConfig",
    "NonFiniteTraining",
    "Observation",
    "Reason",
    "RecordDetector",
    "RewardCollapse",
    "RewardCollapseConfig",
    "RobustStream",
    "RunDetectors",
    "Scale",
    "Severity",
    "StaleConfig",
    "Transition",
    "WeakeningConfig",
]
