"""``InversionTrainerCallback``: the monitor in a Hugging Face ``Trainer`` (TRL included).

>>> from inversion_monitor.callbacks import InversionTrainerCallback
>>> callback = InversionTrainerCallback(every_n_steps=10, tokens_per_probe=32)
>>> callback.config.every_n_steps
10

Add it to any trainer::

    Trainer(..., callbacks=[InversionTrainerCallback(endpoint="localhost:50051")])

It probes once per optimizer step (so gradient accumulation is respected),
in ``on_pre_optimizer_step``: after the backward (and gradient clipping) of
the step's last micro-batch, before the weights change, so the probe starts
from that forward's hidden states instead of recomputing the blocks below the
lowest probed one (``.grad`` is not touched); the record is sent at
``on_step_end``. Under DeepSpeed the optimizer has already stepped inside the
backward by then, and sharded weights (FSDP2) are probed as before, so those
runs probe at ``on_step_end`` and recompute the prefix. It
logs ``inversion/...`` values through ``Trainer.log``, so they reach
``log_history`` and every ``report_to`` integration (TensorBoard, W&B, ...).
It calls the base ``transformers.Trainer.log``, not a subclass's override:
TRL's ``SFTTrainer.log`` and ``GRPOTrainer.log`` average and clear their own
metrics (reward, entropy, ...) on every call, so logging through them at probe
steps would change when those metrics are reported.

Under torchrun, accelerate or DeepSpeed every rank probes its own batch on
the same steps as the others, and all send under rank 0's run id (see
:mod:`inversion_monitor.engine.rank_agreement`).

With TRL, only the positions the trainer scores are probed: GRPO's completion
tokens, SFT's completion tokens under ``completion_only_loss``, each packed
document on its own (see :mod:`inversion_monitor.probe.capture`).

Every optimizer step sends one health record, whatever the probe schedule:
the step's loss, grad norm (before clipping) and learning rate as the trainer
computed them, and in TRL's GRPO trainers the KL, clip ratio and completion
length it logs (see :class:`~inversion_monitor.callbacks.hf_health.TrainerHealthTap`);
the probe's statistics join it on the steps the probe runs.

The run kind is detected from the trainer (GRPO, RLOO, PPO-style: ``rl``;
``SFTTrainer`` and a plain ``Trainer``: ``sft``; see
:func:`~inversion_monitor.callbacks.trl_signals.trainer_kind`) unless
``MonitorConfig.kind`` is set. In a GRPO trainer the records also carry the
policy's entropy over completion tokens, reward, advantages and Cui et al.'s
covariance of each optimizer step, read from the trainer's own loss tensors
(:class:`~inversion_monitor.callbacks.trl_signals.GRPOSignalTap`).
"""

from __future__ import annotations

import sys
import weakref
from types import FrameType
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from typing_extensions import Unpack

from inversion_monitor.callbacks.hf_health import TrainerHealthTap
from inversion_monitor.callbacks.trl_signals import GRPOSignalTap, trainer_kind
from inversion_monitor.config import MonitorConfig, MonitorOverrides
from inversion_monitor.engine.training_monitor import InversionMonitor


def _find_trainer(max_depth: int = 16) -> Trainer | None:
    """The ``Trainer`` whose callback handler is calling us (it passes no reference)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class InversionTrainerCallback(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Measures Entropy-Gradient Inversion during ``Trainer.train()``.

    Args:
        config: a :class:`~inversion_monitor.config.MonitorConfig`; default
            from ``INVERSION_MONITOR_*`` environment variables.
        **overrides: any ``MonitorConfig`` field, e.g. ``endpoint="host:50051"``.

    The bearer token is never written to checkpoints: on resume it comes
    from ``INVERSION_MONITOR_TOKEN`` or the arguments again.
    """

    def __init__(
        self, config: MonitorConfig | None = None, **overrides: Unpack[MonitorOverrides]
    ) -> None:
        base = config if config is not None else MonitorConfig.from_env()
        self.config = base.with_overrides(**overrides) if overrides else base
        self.monitor: InversionMonitor | None = None
        self.resume_state: dict[str, Any] | None = None
        self._trainer: weakref.ref[Trainer] | None = None
        self._pending: dict[str, float] | None = None
        self._tap: GRPOSignalTap | None = None
        self._health: TrainerHealthTap | None = None

    # ---------------------------------------------------------------- events

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        trainer = _find_trainer()
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        if self.monitor is None:
            self.monitor = InversionMonitor(
                self.config,
                rank=int(args.process_index),
                world_size=int(args.world_size),
                framework="transformers",
                default_run_name=args.run_name or None,
                kind=trainer_kind(trainer) if trainer is not None else None,
            )
            if self.resume_state:
                self.monitor.load_state_dict(self.resume_state)
        if trainer is not None and self._health is None and self.monitor.enabled:
            try:
                self._health = TrainerHealthTap(trainer)
                self._tap = GRPOSignalTap.attach(trainer)
            except Exception as exc:  # never break training
                self.monitor.report_failure("reading the trainer's health values", exc)
        if model is not None:
            self.monitor.attach(model)

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        """Probe before the weights change, from the training forward's hidden states."""
        if self.monitor is None:
            return
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or getattr(trainer, "is_deepspeed_enabled", False):
            return  # DeepSpeed stepped in the backward already: on_step_end probes
        self.monitor.before_optimizer_step(state.global_step + 1, model)

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """The learning rate the step used (the scheduler steps after this)."""
        if self._health is not None:
            self._health.optimizer_stepped()

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.monitor is None:
            return
        health = self._health.finish() if self._health is not None else {}
        if "learning_rate" not in health:  # no trainer reference: the scheduler's last rate
            scheduler = kwargs.get("lr_scheduler")
            if scheduler is not None and hasattr(scheduler, "get_last_lr"):
                health["learning_rate"] = float(scheduler.get_last_lr()[0])
        rl = self._tap.finish() if self._tap is not None else None
        metrics = self.monitor.step_end(state.global_step, model, rl=rl, health=health)
        if metrics is None or not self.config.log_to_trainer:
            return
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            should_log = control.should_log
            Trainer.log(trainer, dict(metrics))  # not the subclass's: see the module doc
            # the handler's on_log clears should_log: keep the trainer's own log of this step
            control.should_log = control.should_log or should_log
        else:  # no trainer reference: merge into the next regular log
            self._pending = metrics

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = None

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if self._health is not None:
            self._health.remove()
            self._health = None
        if self.monitor is not None:
            self.resume_state = self.monitor.state_dict()
            self.monitor.close()
            self.monitor = None
        self._trainer = None

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        """Constructor arguments (no secrets) and the monitor's resumable state."""
        monitor_state = self.monitor.state_dict() if self.monitor else self.resume_state
        return {
            "args": self.config.public_dict(),
            "attributes": {"resume_state": monitor_state},
        }
