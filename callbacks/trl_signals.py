"""Run kind of a Hugging Face trainer, and the RL signals of TRL's ``GRPOTrainer`` steps.

:func:`trainer_kind` classifies a trainer by its class (no TRL import):
GRPO, RLOO, PPO-style online trainers are ``"rl"``; ``SFTTrainer`` and a plain
``Trainer`` are ``"sft"``; preference, reward-model and distillation trainers are
``"custom"``; anything else is treated as a plain ``Trainer``.

:class:`GRPOSignalTap` reads, inside ``GRPOTrainer._compute_loss`` (TRL
>= 1.16), the per-token log-probs and entropies the trainer computes for its
loss (the first ``_get_per_token_logps_and_entropies`` call with
``compute_entropy=True``), the completion mask and the advantages of the
micro-batch, and the reward mean/std TRL logs for the generation batch. No
extra forward: it only reduces tensors that exist anyway (float64 sums and a
capped copy of the entropies). It wraps the two methods on the trainer
instance and :meth:`GRPOSignalTap.remove` restores them. Any error inside the
tap disables it with one warning; the trainer's own errors pass through.

>>> class GRPOTrainer: ...
>>> class MyTrainer(GRPOTrainer): ...
>>> trainer_kind(MyTrainer())
'rl'
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

from inversion_monitor.rl.signals import RLStats, RLStepAccumulator

logger = logging.getLogger("inversion_monitor")

RL_TRAINERS = frozenset(
    {
        "GRPOTrainer",
        "RLOOTrainer",
        "PPOTrainer",
        "PPOv2Trainer",
        "OnlineDPOTrainer",
        "XPOTrainer",
        "NashMDTrainer",
    }
)
"""Online policy-optimisation trainers (class names, matched anywhere in the MRO)."""
CUSTOM_TRAINERS = frozenset(
    {
        "DPOTrainer",
        "KTOTrainer",
        "ORPOTrainer",
        "CPOTrainer",
        "BCOTrainer",
        "PRMTrainer",
        "RewardTrainer",
        "GKDTrainer",
    }
)
"""Preference, reward-model and distillation trainers: neither SFT nor RL dynamics."""


def trainer_kind(trainer: object) -> str:
    """``"rl"``, ``"sft"`` or ``"custom"`` from the trainer's class hierarchy.

    >>> class SFTTrainer: ...
    >>> class DPOTrainer: ...
    >>> trainer_kind(SFTTrainer()), trainer_kind(DPOTrainer()), trainer_kind(object())
    ('sft', 'custom', 'sft')
    """
    names = {cls.__name__ for cls in type(trainer).__mro__}
    if names & RL_TRAINERS:
        return "rl"
    if names & CUSTOM_TRAINERS:
        return "custom"
    return "sft"


class GRPOSignalTap:
    """Collects the RL signals of each optimizer step of a ``GRPOTrainer``.

    Args:
        trainer: a TRL ``GRPOTrainer`` (or subclass, e.g. ``CorrPOGRPOTrainer``).
        max_tokens: entropies kept per step for the quantiles.

    Use: ``tap = GRPOSignalTap.attach(trainer)`` (None when the trainer is not
    GRPO-like); after each optimizer step ``tap.finish()``; at the end
    ``tap.remove()``.
    """

    def __init__(self, trainer: Any, max_tokens: int = 65_536) -> None:
        self.trainer = trainer
        self.accumulator = RLStepAccumulator(max_tokens)
        self.enabled = True
        self._inside = False
        self._captured: tuple[Any, Any] | None = None
        self._reward: tuple[float | None, float | None] = (None, None)
        self._orig_loss: Callable[..., Any] = trainer._compute_loss
        self._orig_logps: Callable[..., Any] = trainer._get_per_token_logps_and_entropies
        self._had_loss = "_compute_loss" in vars(trainer)
        self._had_logps = "_get_per_token_logps_and_entropies" in vars(trainer)
        trainer._compute_loss = self._compute_loss
        trainer._get_per_token_logps_and_entropies = self._logps

    @classmethod
    def attach(cls, trainer: Any, max_tokens: int = 65_536) -> GRPOSignalTap | None:
        """A tap on ``trainer``, or None when it lacks GRPO's loss internals."""
        if trainer_kind(trainer) != "rl":
            return None
        if not (
            callable(getattr(trainer, "_compute_loss", None))
            and callable(getattr(trainer, "_get_per_token_logps_and_entropies", None))
        ):
            return None
        return cls(trainer, max_tokens)

    def remove(self) -> None:
        """Restore the trainer's methods as found."""
        trainer = self.trainer
        for name, had, orig in (
            ("_compute_loss", self._had_loss, self._orig_loss),
            ("_get_per_token_logps_and_entropies", self._had_logps, self._orig_logps),
        ):
            if had:
                setattr(trainer, name, orig)
            else:
                vars(trainer).pop(name, None)
        self.enabled = False

    # ------------------------------------------------------------ wrapped methods

    def _logps(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig_logps(*args, **kwargs)
        if self._inside and self._captured is None and kwargs.get("compute_entropy"):
            self._captured = (out[0], out[1])
        return out

    def _compute_loss(self, model: Any, inputs: Any) -> Any:
        if not self.enabled or not getattr(model, "training", False):
            return self._orig_loss(model, inputs)
        self._inside, self._captured = True, None
        try:
            loss = self._orig_loss(model, inputs)
        finally:
            self._inside = False
        try:
            self._take(inputs)
        except Exception as exc:  # never break training
            self._disable(exc)
        finally:
            self._captured = None
        return loss

    def _take(self, inputs: Any) -> None:
        if self._captured is None:
            return
        logps, entropies = self._captured
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        advantages = inputs.get("advantages")
        self.accumulator.add(
            mask=mask.bool(),
            entropies=entropies,
            logprobs=logps,
            advantages=advantages.nan_to_num(0.0) if advantages is not None else None,
        )
        metrics = getattr(self.trainer, "_metrics", {}).get("train", {})
        rewards, stds = metrics.get("reward"), metrics.get("reward_std")
        if rewards:  # TRL appends once per generation batch and clears at each log
            self._reward = (float(rewards[-1]), float(stds[-1]) if stds else None)

    def _disable(self, exc: BaseException) -> None:
        self.enabled = False
        self.accumulator.reset()
        message = (
            f"inversion-monitor stopped reading GRPO's RL signals ({type(exc).__name__}: "
            f"{exc}); training and the inversion probe continue"
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------ per step

    def finish(self) -> RLStats | None:
        """The statistics of the optimizer step just ended (None when nothing was seen)."""
        if not self.enabled or self.accumulator.empty:
            return None
        mean, std = self._reward
        stats = self.accumulator.finish(reward_mean=mean, reward_std=std)
        return None if math.isnan(stats.policy_entropy_mean) and stats.tokens == 0 else stats
