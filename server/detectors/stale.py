"""The monitor gone quiet: an open run with no records for a while (checked on a timer)."""

from __future__ import annotations

from pydantic import Field

from inversion_monitor.server.detectors.base import (
    AlertName,
    DetectorConfig,
    Reason,
    Severity,
    Transition,
)


class StaleConfig(DetectorConfig):
    """Parameters of :class:`MonitorStale`."""

    enabled: bool = True
    severity: Severity = Severity.WARNING
    after_s: float = Field(default=600.0, gt=0.0, description="seconds without records")


class MonitorStale:
    """An open run that sent nothing for ``after_s`` seconds.

    >>> det = MonitorStale(StaleConfig(after_s=60))
    >>> det.check(now=100.0, last_update=10.0, step=5, open_run=True).firing
    True
    >>> det.check(now=101.0, last_update=100.5, step=6, open_run=True).reason.value
    'recovered'
    """

    name = AlertName.MONITOR_STALE

    def __init__(self, config: StaleConfig | None = None) -> None:
        self.config = config or StaleConfig()
        self.active = False

    def check(self, now: float, last_update: float, step: int, open_run: bool) -> Transition | None:
        silent = now - last_update
        stale = open_run and silent >= self.config.after_s
        if stale == self.active:
            return None
        self.active = stale
        values = {"silent_seconds": silent, "after_seconds": self.config.after_s}
        if stale:
            return Transition(
                self.name,
                self.config.severity,
                True,
                Reason.SILENT,
                step,
                now,
                "Monitor stale",
                f"no records for {silent:.0f} s (limit {self.config.after_s:g} s); "
                f"last step {step}",
                values,
            )
        return Transition(
            self.name,
            self.config.severity,
            False,
            Reason.RECOVERED if open_run else Reason.RUN_CLOSED,
            step,
            now,
            "Monitor no longer stale",
            f"records again at step {step}" if open_run else f"run closed at step {step}",
            values,
        )
