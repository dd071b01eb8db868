"""The record-driven detectors of one run, chosen by its kind."""

from __future__ import annotations

from inversion_monitor.server.detectors.base import Observation, Transition
from inversion_monitor.server.detectors.config import AlertsConfig
from inversion_monitor.server.detectors.entropy import EntropyCollapse, EntropyExhaustion
from inversion_monitor.server.detectors.inversion import InversionLost, InversionWeakening
from inversion_monitor.server.detectors.stale import MonitorStale


class RunDetectors:
    """The record-driven detectors of one run.

    ``kind`` is the run's kind (``"sft"``, ``"rl"``, ``"custom"`` or ``""``):
    the entropy detectors are set up only for the kinds they judge.

    >>> dets = RunDetectors(AlertsConfig(), kind="sft")
    >>> dets.update(Observation(1, 0.0, -0.5, 64, 2.0))
    []
    >>> [type(d).__name__ for d in dets.detectors]
    ['InversionWeakening', 'InversionLost']
    """

    def __init__(self, config: AlertsConfig, kind: str = "") -> None:
        self.kind = kind
        self.detectors: list[
            InversionWeakening | InversionLost | EntropyCollapse | EntropyExhaustion
        ] = []
        if config.weakening.enabled:
            self.detectors.append(InversionWeakening(config.weakening))
        if config.lost.enabled:
            self.detectors.append(InversionLost(config.lost))
        if config.entropy.enabled and kind in config.entropy.kinds:
            self.detectors.append(EntropyCollapse(config.entropy))
        if config.exhaustion.enabled and kind in config.exhaustion.kinds:
            self.detectors.append(EntropyExhaustion(config.exhaustion))
        self.stale = MonitorStale(config.stale) if config.stale.enabled else None

    def update(self, obs: Observation) -> list[Transition]:
        return [t for det in self.detectors if (t := det.update(obs)) is not None]
