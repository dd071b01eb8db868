"""``InversionLightningCallback``: the monitor in a PyTorch Lightning ``Trainer``.

>>> from inversion_monitor.callbacks import InversionLightningCallback
>>> callback = InversionLightningCallback(every_n_steps=10, tokens_per_probe=32)
>>> callback.config.every_n_steps
10
>>> callback.state_key
"InversionLightningCallback{'endpoint': None, 'project': '', 'run_name': None, 'jsonl_path': None}"

Add it to any trainer whose ``LightningModule`` holds a Hugging Face causal LM::

    Trainer(..., callbacks=[InversionLightningCallback(endpoint="localhost:50051")])

It probes once per optimizer step (so ``accumulate_grad_batches`` is
respected), in ``on_before_optimizer_step``: the weights are still those of
the training forward, whose hidden states the probe starts from instead of
recomputing the blocks below the lowest probed one (sharded weights are
probed after the step, as before). The record is sent after the step, with
its loss. It sends ``inversion/...`` values to every logger of the trainer on
the step axis Lightning uses for the same batch's other metrics, and also puts
them in ``trainer.callback_metrics`` (for ``EarlyStopping`` or
``ModelCheckpoint``). In a distributed run every rank probes its own batch and
sends its own records (labelled with its rank) under one shared run id.

Every optimizer step sends one health record, whatever the probe schedule: the
mean loss of its micro-batches, the learning rate, the grad norm before
clipping where the trainer clips by norm, and any health field the module logs
(see :class:`~inversion_monitor.callbacks.lightning_health.LightningHealthTap`).

The run kind is ``custom`` unless ``MonitorConfig.kind`` says otherwise. An RL
``training_step`` can return ``{"loss": loss, "rl_stats": RLStats}`` (see
:class:`~inversion_monitor.rl.signals.RLStepAccumulator`: from the loss's own
log-probs, entropies and advantages) on the batch that completes the optimizer
step; the records then carry reward, policy entropy and Cui et al.'s covariance.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import Unpack

from inversion_monitor.callbacks.lightning_health import LightningHealthTap
from inversion_monitor.config import MonitorConfig, MonitorOverrides
from inversion_monitor.engine.training_monitor import InversionMonitor, MonitorWarning
from inversion_monitor.probe.architectures import resolve_model
from inversion_monitor.rl.signals import RLStats

_ATTR_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def find_causal_lm(module: nn.Module, model_attr: str | None = None) -> nn.Module:
    """The Hugging Face causal LM the probe should measure inside ``module``.

    With ``model_attr`` (a dotted attribute path such as ``"policy.model"``), that
    module; otherwise ``module`` itself or the first submodule (in registration
    order) that :func:`~inversion_monitor.probe.architectures.resolve_model` accepts,
    preferring one with trainable parameters (so a frozen reference model
    registered first is skipped). Raises LookupError saying what was tried.

    >>> from inversion_monitor.toy.models import tiny_causal_lm
    >>> holder = nn.Module()
    >>> holder.reference = tiny_causal_lm("gpt2").requires_grad_(False)
    >>> holder.policy = tiny_causal_lm("llama")
    >>> find_causal_lm(holder) is holder.policy
    True
    >>> find_causal_lm(holder, "reference") is holder.reference
    True
    """
    if model_attr is not None:
        target: Any = module
        for name in model_attr.split("."):
            target = getattr(target, name, None)
        if not isinstance(target, nn.Module):
            raise LookupError(
                f"model_attr={model_attr!r}: {type(module).__name__} has no submodule there"
            )
        resolve_model(target)  # raises with the reason when it is no supported causal LM
        return target
    frozen: nn.Module | None = None
    first_error: BaseException | None = None
    candidates: list[nn.Module] = [m for _, m in module.named_modules()]
    for candidate in candidates:
        if not hasattr(candidate, "config"):
            continue  # cheap filter: HF models and their wrappers carry a .config
        try:
            resolve_model(candidate)
        except Exception as exc:
            if first_error is None and not isinstance(exc, TypeError):
                first_error = exc  # e.g. an architecture without adapter, or FSDP
            continue
        if any(p.requires_grad for p in candidate.parameters()):
            return candidate
        frozen = frozen if frozen is not None else candidate
    if frozen is not None:
        return frozen
    detail = f" ({type(first_error).__name__}: {first_error})" if first_error else ""
    raise LookupError(
        f"no Hugging Face causal LM found in {type(module).__name__}{detail}; pass "
        "model_attr='<attribute>' naming the submodule that holds it"
    )


class InversionLightningCallback(Callback):  # type: ignore[misc]
    """Measures Entropy-Gradient Inversion during ``Trainer.fit()``.

    Args:
        config: a :class:`~inversion_monitor.config.MonitorConfig`; default
            from ``INVERSION_MONITOR_*`` environment variables.
        model_attr: dotted path of the causal LM inside the ``LightningModule``
            (e.g. ``"model"``); default: found automatically
            (see :func:`find_causal_lm`).
        **overrides: any ``MonitorConfig`` field, e.g. ``endpoint="host:50051"``.

    Raises:
        ValueError: a bad override or ``model_attr``, naming the field.

    With ``every_n_steps`` all ranks probe at the same steps by construction;
    with the time budget they agree once per optimizer step (one tiny
    all-reduce, see :mod:`inversion_monitor.engine.rank_agreement`) to probe
    together, so no rank stalls the others alone. The
    bearer token is never written to checkpoints: on resume it comes from
    ``INVERSION_MONITOR_TOKEN`` or the arguments again.

    >>> try:
    ...     InversionLightningCallback(overhead_budget=2.0)
    ... except ValueError as exc:
    ...     print(exc)
    invalid MonitorConfig: overhead_budget: Input should be less than 1 (got 2.0)
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        model_attr: str | None = None,
        **overrides: Unpack[MonitorOverrides],
    ) -> None:
        base = config if config is not None else MonitorConfig.from_env()
        self.config = base.with_overrides(**overrides) if overrides else base
        if model_attr is not None and (
            not isinstance(model_attr, str) or not _ATTR_PATH.fullmatch(model_attr)
        ):
            raise ValueError(
                f"model_attr: expected a dotted attribute path like 'model' or "
                f"'policy.model' (got {model_attr!r})"
            )
        self.model_attr = model_attr
        self.monitor: InversionMonitor | None = None
        self._model: nn.Module | None = None
        self._state: dict[str, Any] | None = None  # the last monitor state (checkpointed)
        self._load_pending = False
        self._last_step = 0
        self._health: LightningHealthTap | None = None
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        """Distinguishes callbacks sending to different places in one checkpoint."""
        return str(
            self._generate_state_key(
                endpoint=self.config.endpoint,
                project=self.config.project,
                run_name=self.config.run_name,
                jsonl_path=self.config.jsonl_path,
            )
        )

    # ---------------------------------------------------------------- events

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self.config.disabled:
            return
        try:
            self._model = find_causal_lm(pl_module, self.model_attr)
        except Exception as exc:  # never break training
            rank_zero_warn(f"inversion-monitor is off for this run: {exc}", category=MonitorWarning)
            return
        rank, world_size = int(trainer.global_rank), int(trainer.world_size)
        monitor = InversionMonitor(
            self.config,
            rank=rank,
            world_size=world_size,
            framework="lightning",
            default_run_name=_logger_run_name(trainer) if rank == 0 else None,
            kind="custom",  # a LightningModule's loop is its own; MonitorConfig.kind overrides
        )
        if self._load_pending and self._state is not None:
            _restore(monitor, self._state)
            self._load_pending = False
        monitor.attach(self._model)  # every rank reaches this point: rank 0's run id for all
        self.monitor = monitor
        try:
            self._health = LightningHealthTap(trainer)
        except Exception as exc:  # never break training
            monitor.report_failure("reading the trainer's health values", exc)
        self._last_step = int(trainer.global_step)
        if (
            self.config.log_to_trainer
            and not trainer.loggers
            and not self.config.endpoint
            and not self.config.jsonl_path
        ):
            rank_zero_warn(
                "inversion-monitor has nowhere to send records but trainer.callback_metrics: "
                "give the Trainer a logger, or set endpoint= or jsonl_path=",
                category=MonitorWarning,
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Probe before the weights change, from the training forward's hidden states."""
        monitor, model = self.monitor, self._model
        if monitor is None or model is None:
            return
        if self._health is not None:
            self._health.optimizer_stepping(optimizer)
        # every rank gets here at every optimizer step; a second optimizer of the
        # same step is a no-op (the monitor decided this step already)
        monitor.before_optimizer_step(int(trainer.global_step) + 1, model)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        monitor, model, health = self.monitor, self._model, self._health
        step = int(trainer.global_step)
        if monitor is None or model is None:
            return
        if health is not None:
            health.add_batch(outputs)
        if step == self._last_step:
            return  # still accumulating gradients: no optimizer step yet
        self._last_step = step
        values = health.finish(trainer) if health is not None else {}
        rl = outputs.get("rl_stats") if isinstance(outputs, Mapping) else None
        metrics = monitor.step_end(
            step, model, rl=rl if isinstance(rl, RLStats) else None, health=values
        )
        if metrics and self.config.log_to_trainer:
            try:
                self._log(trainer, pl_module, metrics, step)
            except Exception as exc:  # never break training
                self._warn_once("log", f"inversion-monitor could not log metrics ({exc})")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain values: run id and name, sampler and schedule (no token)."""
        if self.monitor is not None:
            return {"rank": self.monitor.rank, "monitor": self.monitor.state_dict()}
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the checkpointed run (applied when training starts)."""
        if not state_dict.get("monitor"):
            return
        self._state = dict(state_dict)
        if self.monitor is not None:
            _restore(self.monitor, self._state)
        else:
            self._load_pending = True

    # ---------------------------------------------------------------- internals

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        metrics: dict[str, float],
        step: int,
    ) -> None:
        # callback_metrics (EarlyStopping, ModelCheckpoint); loggers get them directly
        # below, since Lightning forwards logged values only every log_every_n_steps
        pl_module.log_dict(
            metrics,
            on_step=True,
            on_epoch=False,
            prog_bar=False,
            logger=False,
            sync_dist=False,
            batch_size=1,
        )
        # the step Lightning gives the same batch's loss in the loggers (as LearningRateMonitor)
        log_step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", step - 1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(log_step))

    def _close(self) -> None:
        if self._health is not None:
            self._health.remove()
            self._health = None
        monitor, self.monitor, self._model = self.monitor, None, None
        if monitor is None:
            return
        self._state = {"rank": monitor.rank, "monitor": monitor.state_dict()}
        try:
            monitor.close()
        except Exception as exc:  # never break training
            self._warn_once("close", f"inversion-monitor could not close cleanly ({exc})")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MonitorWarning, stacklevel=3)


def _restore(monitor: InversionMonitor, state: Mapping[str, Any]) -> None:
    """Load a checkpointed state; another rank's sampler keeps this rank's own seed."""
    monitor_state = dict(state["monitor"])
    sampler = monitor_state.get("sampler")
    if isinstance(sampler, Mapping) and state.get("rank", 0) != monitor.rank:
        monitor_state["sampler"] = {**sampler, "seed": monitor.sampler.state_dict()["seed"]}
    monitor.load_state_dict(monitor_state)


def _logger_run_name(trainer: pl.Trainer) -> str | None:
    """``name/version`` of the trainer's first logger, e.g. ``lightning_logs/version_3``."""
    try:
        logger = trainer.logger
        if logger is None:
            return None
        version = logger.version
        version = f"version_{version}" if isinstance(version, int) else version
        parts = [str(p) for p in (logger.name, version) if p not in (None, "")]
        return "/".join(parts) or None
    except Exception:
        return None
