"""The training health of each optimizer step of a Hugging Face ``Trainer``, as it computed it.

:class:`TrainerHealthTap` reads, with no extra forward and no change to
training, the values ``Trainer`` computes at every optimizer step but only
logs every ``logging_steps``:

* ``loss``: the sum of what ``training_step`` returned over the step's
  micro-batches (the quantity the trainer averages into its logged ``loss``;
  a NaN or inf is kept, where the trainer's ``logging_nan_inf_filter``
  would hide it);
* ``grad_norm``: the return value of ``Trainer._get_grad_norm``, the norm
  before clipping (``clip_grad_norm_``'s answer) that the trainer logs;
* ``learning_rate``: ``Trainer._get_learning_rate()`` read in
  ``on_optimizer_step``, before the scheduler steps: the rate the step used,
  the value the trainer logs for it;
* in TRL's GRPO trainers, from ``trainer._metrics["train"]`` (TRL 1.16 names):
  ``kl`` (``"kl"``, mean of the step's micro-batches), ``clip_ratio``
  (``"clip_ratio/region_mean"``, or ``"cispo_clip_ratio"``) and
  ``completion_length_mean`` (``"completions/mean_length"`` of the
  generation batch the step trained on).

It wraps ``training_step`` and ``_get_grad_norm`` on the trainer instance;
:meth:`TrainerHealthTap.remove` restores them. Reading the loss and the norm is
one device sync per optimizer step (the trainer's own NaN filter already syncs
once per micro-batch). Any error inside the tap disables it with one warning;
the trainer's own errors pass through.

>>> class Toy:
...     def training_step(self, model, inputs, n=None): return 0.5
...     def _get_grad_norm(self, model, grad_norm=None): return 2.0
...     def _get_learning_rate(self): return 1e-3
>>> trainer = Toy()
>>> tap = TrainerHealthTap(trainer)
>>> trainer.training_step(None, None), trainer.training_step(None, None)
(0.5, 0.5)
>>> _ = trainer._get_grad_norm(None); tap.optimizer_stepped()
>>> tap.finish()
{'loss': 1.0, 'grad_norm': 2.0, 'learning_rate': 0.001}
>>> tap.remove(); "training_step" in vars(trainer)
False
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("inversion_monitor")

# health field -> (TRL metric names, first found wins; "mean": of the step's new values,
# "last": the newest value, kept until a new generation batch logs one)
TRL_METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "kl": (("kl",), "mean"),
    "clip_ratio": (("clip_ratio/region_mean", "cispo_clip_ratio"), "mean"),
    "completion_length_mean": (("completions/mean_length",), "last"),
}


class TrainerHealthTap:
    """Collects the loss, grad norm, learning rate (and TRL's RL metrics) of each step.

    Use: ``tap = TrainerHealthTap(trainer)``; in ``on_optimizer_step``
    ``tap.optimizer_stepped()``; in ``on_step_end`` ``tap.finish()`` (the
    step's values, by health field name); at the end ``tap.remove()``.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.enabled = True
        self._loss: Any = None
        self._grad_norm: Any = None
        self._learning_rate: float | None = None
        # TRL metric name -> (the list object last read, its length then)
        self._seen: dict[str, tuple[list[float], int]] = {}
        self._last: dict[str, float] = {}
        self._wrapped: list[tuple[str, bool, Callable[..., Any]]] = []
        self._orig_training_step = self._wrap("training_step", self._training_step)
        self._orig_grad_norm = self._wrap("_get_grad_norm", self._get_grad_norm)

    def _wrap(self, name: str, wrapper: Callable[..., Any]) -> Callable[..., Any]:
        """Put ``wrapper`` in place of the trainer's method ``name``; returns the method."""
        original: Callable[..., Any] | None = getattr(self.trainer, name, None)
        if original is None or not callable(original):
            return wrapper  # never called: nothing was wrapped
        self._wrapped.append((name, name in vars(self.trainer), original))
        setattr(self.trainer, name, wrapper)
        return original

    def remove(self) -> None:
        """Restore the trainer's methods as found."""
        for name, had, original in self._wrapped:
            if had:
                setattr(self.trainer, name, original)
            else:
                vars(self.trainer).pop(name, None)
        self._wrapped.clear()
        self.enabled = False

    # ------------------------------------------------------------ wrapped methods

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = self._orig_training_step(*args, **kwargs)
        if self.enabled:
            try:
                step_loss = loss.detach() if hasattr(loss, "detach") else loss
                self._loss = step_loss if self._loss is None else self._loss + step_loss
            except Exception as exc:  # never break training
                self._disable(exc)
        return loss

    def _get_grad_norm(self, *args: Any, **kwargs: Any) -> Any:
        norm = self._orig_grad_norm(*args, **kwargs)
        self._grad_norm = norm
        return norm

    # ------------------------------------------------------------ per step

    def optimizer_stepped(self) -> None:
        """After ``optimizer.step()``, before the scheduler steps: the step's learning rate."""
        if not self.enabled:
            return
        try:
            self._learning_rate = float(self.trainer._get_learning_rate())
        except Exception as exc:  # never break training
            self._disable(exc)

    def finish(self) -> dict[str, float]:
        """The values of the optimizer step just ended, by health field name."""
        loss, norm, rate = self._loss, self._grad_norm, self._learning_rate
        self._loss = self._grad_norm = self._learning_rate = None
        if not self.enabled:
            return {}
        try:
            values: dict[str, float] = {}
            for name, value in (("loss", loss), ("grad_norm", norm), ("learning_rate", rate)):
                if value is not None:
                    values[name] = float(value)
            metrics = getattr(self.trainer, "_metrics", None)
            if isinstance(metrics, Mapping) and isinstance(metrics.get("train"), Mapping):
                values.update(self._trl_values(metrics["train"]))
            return values
        except Exception as exc:  # never break training
            self._disable(exc)
            return {}

    def _trl_values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        found: dict[str, float] = {}
        for field, (names, how) in TRL_METRICS.items():
            for name in names:
                new = self._new_values(metrics, name)
                if new:
                    value = sum(new) / len(new) if how == "mean" else new[-1]
                    self._last[field] = float(value)
                    found[field] = float(value)
                    break
            else:
                if how == "last" and field in self._last:
                    found[field] = self._last[field]
        return found

    def _new_values(self, metrics: Mapping[str, Any], name: str) -> list[float]:
        """The values TRL appended under ``name`` since the last step (it clears at each log)."""
        values = metrics.get(name)
        if not isinstance(values, list) or not values:
            return []
        seen, count = self._seen.get(name, (None, 0))
        start = count if seen is values and count <= len(values) else 0
        self._seen[name] = (values, len(values))
        return [float(v) for v in values[start:] if v is not None]

    def _disable(self, exc: BaseException) -> None:
        self.enabled = False
        message = (
            f"inversion-monitor stopped reading the trainer's loss and grad norm "
            f"({type(exc).__name__}: {exc}); training and the probe continue"
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
