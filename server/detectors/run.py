"""The record-driven detectors of one run, chosen by its kind."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from inversion_monitor.server.detectors.base import AlertName, Observation, Transition
from inversion_monitor.server.detectors.config import AlertsConfig
from inversion_monitor.server.detectors.entropy import (
    EntropyCollapse,
    EntropyExhaustion,
    EntropySurge,
)
from inversion_monitor.server.detectors.inversion import InversionLost, InversionWeakening
from inversion_monitor.server.detectors.length import LengthDrift
from inversion_monitor.server.detectors.nonfinite import NonFiniteTraining
from inversion_monitor.server.detectors.reward import RewardCollapse
from inversion_monitor.server.detectors.robust import DriftDetector
from inversion_monitor.server.detectors.spikes import GradNormSpike, KLSurge, LossSpike
from inversion_monitor.server.detectors.stale import MonitorStale


class RecordDetector(Protocol):
    """A detector fed every record of the run (in step order)."""

    name: AlertName

    def update(self, obs: Observation) -> Transition | None: ...


class RunDetectors:
    """The record-driven detectors of one run.

    ``kind`` is the run's kind (``"sft"``, ``"rl"``, ``"custom"`` or ``""``):
    each detector is set up only for the kinds it judges (its ``kinds`` setting).

    >>> dets = RunDetectors(AlertsConfig(), kind="sft")
    >>> dets.update(Observation(1, 0.0, -0.5, 64, 2.0))
    []
    >>> [type(d).__name__ for d in dets.detectors]  # doctest: +NORMALIZE_WHITESPACE
    ['InversionWeakening', 'InversionLost', 'NonFiniteTraining', 'LossSpike', 'GradNormSpike',
     'RewardCollapse', 'EntropySurge', 'KLSurge', 'LengthDrift']
    """

    def __init__(self, config: AlertsConfig, kind: str = "") -> None:
        self.kind = kind
        self.detectors: list[RecordDetector] = []
        if config.weakening.enabled:
            self.detectors.append(InversionWeakening(config.weakening))
        if config.lost.enabled:
            self.detectors.append(InversionLost(config.lost))
        if config.entropy.enabled and kind in config.entropy.kinds:
            self.detectors.append(EntropyCollapse(config.entropy))
        if config.exhaustion.enabled and kind in config.exhaustion.kinds:
            self.detectors.append(EntropyExhaustion(config.exhaustion))
        if config.nonfinite.enabled and kind in config.nonfinite.kinds:
            self.detectors.append(NonFiniteTraining(config.nonfinite))
        for cfg, make in (
            (config.loss_spike, LossSpike),
            (config.grad_norm_spike, GradNormSpike),
            (config.reward_collapse, RewardCollapse),
            (config.entropy_surge, EntropySurge),
            (config.kl_surge, KLSurge),
            (config.length_drift, LengthDrift),
        ):
            if cfg.enabled and kind in cfg.kinds:
                self.detectors.append(make(cfg))  # type: ignore[arg-type]
        self.stale = MonitorStale(config.stale) if config.stale.enabled else None
        # (detector, the field it needs, the fields it idles without): a plain DriftDetector
        # judges only a finite value of its field, and a detector that names ``idle_without``
        # returns None and changes nothing while every one of those fields is None, so such a
        # record skips the call (the same answer, run once per record and detector)
        self._plan: list[
            tuple[Callable[[Observation], Transition | None], str | None, tuple[str, ...]]
        ] = [(det.update, _needed_field(det), _idle_without(det)) for det in self.detectors]

    def update(self, obs: Observation) -> list[Transition]:
        out: list[Transition] = []
        isfinite = math.isfinite
        for update, needed, idle in self._plan:  # each detector's bound update, made once
            if needed is not None:
                x = getattr(obs, needed)
                if x is None or not isfinite(x):
                    continue
            elif idle:
                for name in idle:
                    if getattr(obs, name) is not None:
                        break
                else:
                    continue
            t = update(obs)
            if t is not None:
                out.append(t)
        return out


def _needed_field(det: RecordDetector) -> str | None:
    """The Observation field without a finite value of which ``det.update`` returns None at
    once (a DriftDetector that overrides neither ``value`` nor ``update``), else None."""
    if not isinstance(det, DriftDetector):
        return None
    kind = type(det)
    if kind.update is DriftDetector.update and kind.value is DriftDetector.value:
        return det.field
    return None


def _idle_without(det: RecordDetector) -> tuple[str, ...]:
    """The Observation fields that, all None, leave ``det.update`` a no-op returning None (the
    detector's own ``idle_without``), else () (always called)."""
    idle: tuple[str, ...] = getattr(det, "idle_without", ())
    return idle
