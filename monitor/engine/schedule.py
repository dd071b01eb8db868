"""When to probe: every N optimizer steps, or within a fraction of wall time.

With a budget b, each step earns ``b / (1 - b) x (its wall time without
probing)`` of credit; a probe runs when the credit is not negative and spends
what it actually cost. Probe time P and the rest R then satisfy
``P = b / (1 - b) x R``, i.e. ``P / (P + R) = b``, whatever the model, batch
or machine. Credit is capped at one probe's cost, so a long pause
(evaluation, checkpointing) does not cause a burst.

>>> schedule = ProbeSchedule(every_n_steps=3)
>>> [step for step in range(1, 10) if schedule.should_probe(step)]
[3, 6, 9]
>>> budget, clock, probed = ProbeSchedule(overhead_budget=0.1), 0.0, []
>>> budget.start(now=clock)
>>> for step in range(1, 40):           # steps of 0.9 s, probes of 1 s
...     clock += 0.9
...     if budget.should_probe(step):
...         probed.append(step); clock += 1.0; budget.probe_done(seconds=1.0)
...     budget.step_ended(now=clock)
>>> probed, round(budget.overhead, 3)
([1, 11, 22, 32], 0.102)
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from inversion_monitor.config import MonitorConfig, default, validate_field


class ProbeSchedule:
    """Decides, step by step, whether to probe (see the module docstring).

    Defaults and bounds are those of the :class:`~inversion_monitor.config.MonitorConfig`
    fields of the same names; :meth:`from_config` builds one from a config.

    Args:
        every_n_steps: probe at steps divisible by N (overrides the budget).
        overhead_budget: fraction of wall time the probes may take.
        first_step: no probe before this step.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = default("every_n_steps"),
        overhead_budget: float = default("overhead_budget"),
        first_step: int = default("first_step"),
    ) -> None:
        self.every_n_steps: int | None = validate_field("every_n_steps", every_n_steps)
        self.overhead_budget: float = validate_field("overhead_budget", overhead_budget)
        self.first_step: int = validate_field("first_step", first_step)
        self.credit_s = 0.0
        self.expected_cost_s: float | None = None
        self.probe_s = 0.0  # probe time since the last step end
        self.last_step_end: float | None = None
        self.total_probe_s = 0.0
        self.total_wall_s = 0.0

    @classmethod
    def from_config(cls, config: MonitorConfig) -> ProbeSchedule:
        """The schedule ``config`` asks for.

        >>> ProbeSchedule.from_config(MonitorConfig(every_n_steps=5)).every_n_steps
        5
        """
        return cls(
            every_n_steps=config.every_n_steps,
            overhead_budget=config.overhead_budget,
            first_step=config.first_step,
        )

    def start(self, *, now: float) -> None:
        """Start the clock (training begins): the first step's time then counts too."""
        self.last_step_end = now
        self.probe_s = 0.0

    @property
    def same_on_every_rank(self) -> bool:
        """True when the answer depends on the step alone (a fixed schedule), so ranks
        need no vote to agree; the time budget depends on each rank's clock.

        >>> ProbeSchedule(every_n_steps=4).same_on_every_rank, ProbeSchedule().same_on_every_rank
        (True, False)
        """
        return self.every_n_steps is not None

    def should_probe(self, step: int) -> bool:
        """True when ``step`` (an optimizer step just completed) should be probed."""
        if step < self.first_step:
            return False
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self.credit_s >= 0.0

    def probe_done(self, *, seconds: float) -> None:
        """Account for a probe that took ``seconds``."""
        self.probe_s += seconds
        self.total_probe_s += seconds
        self.credit_s -= seconds
        previous = self.expected_cost_s
        self.expected_cost_s = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    def step_ended(self, *, now: float) -> None:
        """Call once per optimizer step, after any probe, with a monotonic clock."""
        if self.last_step_end is not None:
            wall = max(0.0, now - self.last_step_end)
            self.total_wall_s += wall
            rate = self.overhead_budget / (1.0 - self.overhead_budget)
            self.credit_s += rate * max(0.0, wall - self.probe_s)
            self.credit_s = min(self.credit_s, self.expected_cost_s or 0.0)
        self.last_step_end = now
        self.probe_s = 0.0

    @property
    def overhead(self) -> float:
        """Measured fraction of wall time spent probing so far (NaN before two steps)."""
        return self.total_probe_s / self.total_wall_s if self.total_wall_s > 0 else math.nan

    def state_dict(self) -> dict[str, Any]:
        """Plain values to checkpoint (timers restart on resume)."""
        return {"credit_s": self.credit_s, "expected_cost_s": self.expected_cost_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.credit_s = float(state.get("credit_s", 0.0))
        cost = state.get("expected_cost_s")
        self.expected_cost_s = None if cost is None else float(cost)


def probe_clock(model: nn.Module) -> float:
    """``time.perf_counter()`` once the device work already queued on ``model``'s CUDA
    devices is done: the start of a probe's clock.

    The host runs ahead of a GPU, so at the end of a training step its kernels are
    still queued; a clock started then charges them to the probe (the budget
    schedule then sees its overhead several times too high and probes too rarely).
    On CPU it is the plain clock.

    >>> probe_clock(nn.Linear(2, 2)) <= time.perf_counter()
    True
    """
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)
    return time.perf_counter()
