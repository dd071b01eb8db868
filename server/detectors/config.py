"""Every detector's settings in one model (the server's ``--alerts-config`` file)."""

from __future__ import annotations

from pydantic import Field

from inversion_monitor.server.detectors.base import DetectorConfig
from inversion_monitor.server.detectors.entropy import (
    EntropyConfig,
    EntropySurgeConfig,
    ExhaustionConfig,
)
from inversion_monitor.server.detectors.inversion import LostConfig, WeakeningConfig
from inversion_monitor.server.detectors.length import LengthDriftConfig
from inversion_monitor.server.detectors.nonfinite import NonFiniteConfig
from inversion_monitor.server.detectors.reward import RewardCollapseConfig
from inversion_monitor.server.detectors.spikes import (
    GradNormSpikeConfig,
    KLSurgeConfig,
    LossSpikeConfig,
)
from inversion_monitor.server.detectors.stale import StaleConfig


class AlertsConfig(DetectorConfig):
    """All detector settings; defaults apply without a file.

    >>> AlertsConfig().weakening.min_shift
    0.2
    >>> AlertsConfig.model_validate({"lost": {"sustain": 3}}).lost.sustain
    3
    >>> AlertsConfig.model_validate({"grad_norm_spike": {"threshold": 12}}).grad_norm_spike.k
    2.0
    """

    weakening: WeakeningConfig = WeakeningConfig()
    lost: LostConfig = LostConfig()
    entropy: EntropyConfig = EntropyConfig()
    exhaustion: ExhaustionConfig = ExhaustionConfig()
    stale: StaleConfig = StaleConfig()
    # training health, self-calibrating per run (robust level and scale, CUSUM)
    nonfinite: NonFiniteConfig = NonFiniteConfig()
    loss_spike: LossSpikeConfig = LossSpikeConfig()
    grad_norm_spike: GradNormSpikeConfig = GradNormSpikeConfig()
    reward_collapse: RewardCollapseConfig = RewardCollapseConfig()
    entropy_surge: EntropySurgeConfig = EntropySurgeConfig()
    kl_surge: KLSurgeConfig = KLSurgeConfig()
    length_drift: LengthDriftConfig = LengthDriftConfig()
    # annotation runbook_url of Alertmanager alerts; {alertname} is substituted
    runbook_url: str = "https://github.com/inversion-monitor/inversion-monitor/blob/main/deploy/runbook.md#{alertname}"
    # seconds between re-sends of active alerts to Alertmanager
    resend_s: float = Field(default=30.0, gt=0.0)


# ---------------------------------------------------------------- detectors
