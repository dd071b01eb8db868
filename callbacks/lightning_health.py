"""The training health of each optimizer step of a Lightning ``Trainer``, as it computed it.

:class:`LightningHealthTap` gathers, with no extra forward and no change to
training:

* ``loss``: the mean of the ``loss`` the ``training_step`` returned over the
  step's micro-batches (``accumulate_grad_batches``), NaN and inf kept;
* ``learning_rate``: the first optimizer's first parameter group, read in
  ``on_before_optimizer_step`` (the rate the step uses, before a scheduler
  steps);
* ``grad_norm``: where the user clips by norm (``gradient_clip_val`` with
  ``gradient_clip_algorithm="norm"``), the total norm before clipping that
  ``clip_grad_norm_`` returns inside Lightning's clipping, which discards it:
  the tap replaces the precision plugin's ``clip_grad_by_norm`` on this
  trainer by the same one call, keeping its answer (only for plugins that use
  the base implementation; sharded ones keep their own);
* any health field the ``LightningModule`` logs itself (``self.log``), under
  its name or ending in ``/<name>`` (``"train/kl"``, ``"reward_mean"``,
  ``"grad_norm"``): see :data:`~inversion_monitor.engine.health.HEALTH_FIELDS`.

Reading the loss is one device sync per optimizer step.

>>> logged_health({"train/kl": 0.5, "inversion/n": 3.0, "rl/reward_mean": 1.0, "acc": 0.9})
{'kl': 0.5}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision

from inversion_monitor.engine.health import HEALTH_FIELDS

_FIELDS = frozenset(HEALTH_FIELDS)
_OURS = ("inversion/", "rl/")  # what the monitor itself logs


def logged_health(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The health fields among a module's logged metrics (the last name part decides)."""
    found: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(_OURS):
            continue
        name = key.rsplit("/", 1)[-1]
        if name not in _FIELDS:
            continue
        try:
            found[name] = float(value)
        except (TypeError, ValueError):
            continue
    return found


class LightningHealthTap:
    """Collects the loss, learning rate and clipped grad norm of each optimizer step.

    Use: ``tap = LightningHealthTap(trainer)``; ``tap.add_batch(outputs)`` in
    every ``on_train_batch_end``; ``tap.optimizer_stepping(optimizer)`` in
    ``on_before_optimizer_step``; ``tap.finish(trainer)`` once the step
    ended; ``tap.remove()`` at the end.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._losses: list[torch.Tensor | float] = []
        self._grad_norm: torch.Tensor | None = None
        self._learning_rate: float | None = None
        self._plugin: Any = None
        plugin = getattr(trainer, "precision_plugin", None)
        if (
            isinstance(plugin, Precision)
            and type(plugin).clip_grad_by_norm is Precision.clip_grad_by_norm
        ):
            plugin.clip_grad_by_norm = self._clip_grad_by_norm
            self._plugin = plugin

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        # Precision.clip_grad_by_norm, keeping the norm it computes
        parameters = self._plugin.main_params(optimizer)
        self._grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_val)

    def remove(self) -> None:
        """Give the precision plugin its own method back."""
        if self._plugin is not None:
            vars(self._plugin).pop("clip_grad_by_norm", None)
            self._plugin = None

    def add_batch(self, outputs: Any) -> None:
        """The loss a ``training_step`` returned (a micro-batch of the current step)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())
        elif isinstance(loss, int | float) and not isinstance(loss, bool):
            self._losses.append(float(loss))

    def optimizer_stepping(self, optimizer: Any) -> None:
        """Before ``optimizer.step()``: the learning rate the step uses."""
        try:
            self._learning_rate = float(optimizer.param_groups[0]["lr"])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            self._learning_rate = None

    def finish(self, trainer: Any) -> dict[str, float]:
        """The values of the optimizer step that just ended, by health field name."""
        losses, norm, rate = self._losses, self._grad_norm, self._learning_rate
        self._losses, self._grad_norm, self._learning_rate = [], None, None
        values = logged_health(getattr(trainer, "callback_metrics", {}) or {})
        if losses:
            device = next((x.device for x in losses if isinstance(x, torch.Tensor)), None)
            stacked = torch.stack(
                [torch.as_tensor(x, dtype=torch.float64, device=device) for x in losses]
            )
            values["loss"] = float(stacked.mean())  # the step's one sync
        if norm is not None:
            values["grad_norm"] = float(norm)
        if rate is not None:
            values["learning_rate"] = rate
        return values
