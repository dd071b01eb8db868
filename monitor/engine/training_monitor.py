"""``InversionMonitor``: the framework-free engine behind every callback.

It owns the configuration, the batch capture, the schedule, the probe, the
statistics and the sinks (the trainer's logs, a JSONL file, the gRPC client; see
:mod:`inversion_monitor.engine.sinks`).
A framework adapter only calls :meth:`InversionMonitor.attach` when training
starts, :meth:`InversionMonitor.step_end` after every optimizer step, and
:meth:`InversionMonitor.close` at the end. Where the framework has a hook
between the backward and the optimizer step, the adapter also calls
:meth:`InversionMonitor.before_optimizer_step` there: the probe then runs while
the weights are still those of the training forward and starts from that
forward's hidden states below the lowest probed block instead of recomputing
them (:mod:`inversion_monitor.probe.prefix_capture`); its record is sent by
:meth:`InversionMonitor.step_end` with the step's loss.

It never breaks training: any error inside is caught, reported once with a
clear warning, and the monitor stops probing (``on_error="disable"``; the
health record still goes out every step, so the server's training-health
alerts keep watching) or keeps trying (``"continue"``). It leaves gradients,
RNG streams and modes as it found them (see :mod:`inversion_monitor.probe.gradients`).

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("llama").train()
>>> monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=16))
>>> monitor.attach(model)
>>> ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
>>> _ = model(input_ids=ids)              # the training forward is captured
>>> metrics = monitor.step_end(1, model)
>>> sorted(metrics)[:3], metrics["inversion/n"]
(['inversion/ci_high', 'inversion/ci_low', 'inversion/entropy_mean'], 16.0)
>>> monitor.close()
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from inversion_monitor._version import __version__
from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.health import step_health
from inversion_monitor.engine.packing_check import PackingCheck
from inversion_monitor.engine.probing import Measured, ProbePlan, measure, token_samples
from inversion_monitor.engine.rank_agreement import RankAgreement, Verdict, process_place
from inversion_monitor.engine.schedule import ProbeSchedule, probe_clock
from inversion_monitor.engine.sinks import (
    GrpcSink,
    JsonlSink,
    Sink,
    TrainerLogSink,
    TrainingRecord,
    trainer_metrics,
)
from inversion_monitor.metrics.stats import InversionStats
from inversion_monitor.probe.architectures import resolve_model
from inversion_monitor.probe.capture import BatchCapture, CapturedBatch
from inversion_monitor.probe.gradients import ProbeResult
from inversion_monitor.probe.prefix_capture import PrefixCapture
from inversion_monitor.probe.sampling import TokenSampler
from inversion_monitor.probe.sharding import sharded_parameters
from inversion_monitor.rl.signals import RLStats

if TYPE_CHECKING:
    from inversion_monitor.telemetry.window import DeliveryReport

__all__ = ["InversionMonitor", "MonitorWarning", "trainer_metrics"]

logger = logging.getLogger("inversion_monitor")


class MonitorWarning(RuntimeWarning):
    """Something kept the monitor from measuring; training goes on."""


class InversionMonitor:
    """Schedules probes of a training model and sends what they measure.

    Args:
        config: a :class:`MonitorConfig` (default: from the environment).
        rank, world_size: this process's place in a distributed job; when
            ``torch.distributed`` is initialised, its rank and world size win
            (the HF Trainer reports world size 1 under DeepSpeed on CPU).
        framework: e.g. ``"transformers"``, ``"lightning"``, ``"custom"``.
        default_run_name: used when ``config.run_name`` is unset.
        kind: the run kind the adapter detected (``"sft"``, ``"rl"``,
            ``"custom"``); ``config.kind`` takes precedence.

    In a distributed job (``torch.distributed`` initialised, more than one
    rank) every rank must call :meth:`attach` and :meth:`step_end` (and, if
    used, :meth:`before_optimizer_step`) at the same steps: the ranks then
    share rank 0's run id and probe on exactly the same steps, or none does
    (see :mod:`inversion_monitor.engine.rank_agreement`); a failure on one rank
    disables the monitor on every rank.

    Use from a custom loop::

        monitor = InversionMonitor(MonitorConfig(endpoint="localhost:50051"))
        monitor.attach(model)
        for step, batch in enumerate(loader, 1):
            loss = model(**batch).loss; loss.backward()
            monitor.before_optimizer_step(step, model)   # optional: the cheaper probe
            opt.step(); opt.zero_grad()
            monitor.step_end(step, model, loss=loss.item())
        monitor.close()

    With :meth:`before_optimizer_step` (after the backward, before
    ``opt.step()``; with gradient accumulation, after the last micro-batch's
    backward) the probe starts from the training forward's hidden states
    instead of recomputing the blocks below the lowest probed one; ``.grad``
    is left untouched. Without it, :meth:`step_end` probes after the step
    and recomputes them.

    Every :meth:`step_end` sends one record: the step's training health
    (``loss``, ``grad_norm`` before clipping, ``learning_rate``, and any field
    of :data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS` in
    ``health``), with the probe's statistics on the steps it ran. In an RL
    loop, pass the step's RL signals too (no extra forward: from the tensors
    of the loss)::

        acc = RLStepAccumulator()   # inversion_monitor.rl.signals
        acc.add(mask=completion_mask, entropies=entropies, logprobs=logps, advantages=adv)
        monitor.step_end(step, model, loss=loss.item(), grad_norm=norm.item(),
                         rl=acc.finish(reward_mean=r.mean(), reward_std=r.std()),
                         health={"kl": kl, "completion_length_mean": lengths.mean()})
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        framework: str = "custom",
        default_run_name: str | None = None,
        kind: str | None = None,
    ) -> None:
        self.config = MonitorConfig.from_env() if config is None else config
        rank, world_size = process_place(rank, world_size)
        self.kind = self.config.kind or kind
        if rank < 0 or world_size < 1 or rank >= world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.rank = rank
        self.world_size = world_size
        self.framework = framework
        self.run_id = self.config.run_id or uuid.uuid4().hex
        self.run_name = self.config.run_name or default_run_name or f"run-{self.run_id[:8]}"
        self.enabled = not self.config.disabled
        # False once the probe failed (on_error="disable"): health records continue
        self.probing = True
        self.schedule = ProbeSchedule.from_config(self.config)
        self.sampler = TokenSampler.from_config(self.config, rank=rank)
        self.last_stats: InversionStats | None = None
        self.last_result: ProbeResult | None = None
        # the batch the last probe measured: last_result.positions index into it
        self.last_batch: CapturedBatch | None = None
        self.probes = 0
        self.errors = 0
        self._capture: BatchCapture | None = None
        self._prefix: PrefixCapture | None = None
        self._prefix_note: str | None = None  # why there is no PrefixCapture
        self._pre_step: tuple[int, bool] | None = None  # (step, probe?) decided pre-step
        self._held: Measured | None = None  # a pre-step probe, sent by step_end
        self._model: nn.Module | None = None
        self._trainer_log = TrainerLogSink()
        self.sinks: list[Sink] = [self._trainer_log]
        if self.config.jsonl_path:
            self.sinks.append(JsonlSink(self.config.jsonl_path, rank=rank, world_size=world_size))
        if self.config.endpoint:
            self.sinks.append(
                GrpcSink(
                    self.config,
                    rank=rank,
                    world_size=world_size,
                    framework=framework,
                    model_type=self._model_type,
                )
            )
        self._warned: set[str] = set()
        self._packing = PackingCheck()  # the first packed batch's attention, checked once
        self._joined = False
        self._agreement: RankAgreement | None = None
        self._local_failure = False  # failed here since the last vote (distributed)

    # ------------------------------------------------------------------ lifecycle

    def attach(self, model: nn.Module) -> None:
        """Start capturing ``model``'s training batches (idempotent per model)."""
        if not self.enabled:
            return
        self._join_ranks()
        if not self.probing:
            return
        try:
            if self._model is model and self._capture is not None:
                return
            self.detach()
            self._model = model
            self._capture = BatchCapture(model)
            self._prefix = self._prefix_capture(model)
            self.schedule.start(now=time.monotonic())
        except Exception as exc:  # never break training
            self._fail("attach", exc)

    def _prefix_capture(self, model: nn.Module) -> PrefixCapture | None:
        """Keep the lowest probed block's input of each training forward, where it can be."""
        self._prefix_note = None
        try:
            if sharded_parameters(model):
                self._prefix_note = (
                    "sharded parameters (FSDP2, ZeRO-3): the probe recomputes the prefix"
                )
                return None
            resolved = resolve_model(model)
            lowest = min(resolved.layer_index(layer) for layer in self.config.layers)
            return PrefixCapture(model, lowest)
        except Exception as exc:  # the probe then recomputes the prefix (and says why)
            self._prefix_note = f"no prefix capture ({type(exc).__name__}: {exc})"
            logger.debug("inversion-monitor: %s", self._prefix_note)
            return None

    def _join_ranks(self) -> None:
        """Join the other ranks (a collective, once): the vote group and rank 0's run id.

        The adapters call :meth:`attach` on every rank at the same point.
        """
        rank, self.world_size = process_place(self.rank, self.world_size)
        if rank != self.rank:  # torch.distributed started after the constructor
            self.rank = rank
            self.sampler = TokenSampler.from_config(self.config, rank=rank)
        if self.world_size < 2 or self._joined:
            return
        self._joined = True
        try:
            self._agreement = RankAgreement.join(timeout_s=self.config.agreement_timeout_s)
            if self._agreement is not None:
                self.run_id, self.run_name = self._agreement.run_identity(
                    self.run_id, self.run_name
                )
        except Exception as exc:  # never break training
            self._agreement = None
            self._disable_here("joining the other ranks", exc)

    def detach(self) -> None:
        """Remove the capture hook (sinks stay open)."""
        if self._capture is not None:
            self._capture.remove()
        if self._prefix is not None:
            self._prefix.remove()
        self._capture = None
        self._prefix = None
        self._model = None

    def close(self, timeout_s: float = 10.0) -> DeliveryReport | None:
        """Detach, flush and close the sinks; returns the client's delivery report."""
        self.detach()
        held, self._held = self._held, None
        if held is not None:  # a pre-step probe whose step_end never came
            try:
                self._emit(held.step, held, {})
            except Exception as exc:
                self._fail("close", exc)
        if self._agreement is not None:  # no more votes: the other ranks may be closing too
            self._agreement.close()
            self._agreement = None
        report = None
        for sink in self.sinks:
            try:
                report = sink.close(timeout_s=timeout_s) or report
            except Exception as exc:
                self._fail("close", exc)
        return report

    # ------------------------------------------------------------------ per step

    def step_end(
        self,
        step: int,
        model: nn.Module | None = None,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
        grad_norm: float | None = None,
        probe: bool | None = None,
        rl: RLStats | None = None,
        health: Mapping[str, float | None] | None = None,
    ) -> dict[str, float] | None:
        """Call after each optimizer step: sends the step's health record; probes when scheduled.

        ``loss``, ``learning_rate`` (the one the step used) and ``grad_norm``
        (before clipping) are the trainer's values; ``health`` adds any other
        field of :data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`
        (e.g. ``kl``, ``clip_ratio``, ``completion_length_mean``); ``rl``: the
        step's RL signals (:class:`~inversion_monitor.rl.signals.RLStats`).
        NaN and infinities are sent as such. ``probe`` overrides the
        schedule's decision for this step: the answer of :meth:`decide`, or a
        value that is the same on every rank; None asks :meth:`decide`.
        Returns the ``inversion/...`` (and ``rl/...``) metrics when it
        probed, else None.
        """
        if not self.enabled:
            return None
        pre, self._pre_step = self._pre_step, None
        held, self._held = self._held, None
        values: dict[str, float] | None = None
        measured = None
        try:
            if rl is not None and not isinstance(rl, RLStats):
                raise TypeError(f"rl must be an RLStats, got {type(rl).__name__}")
            values = step_health(
                loss=loss, learning_rate=learning_rate, grad_norm=grad_norm, rl=rl, extra=health
            )
            if held is not None:  # probed before the optimizer step: sent with this step
                if held.step == step:
                    measured = held
                else:  # its step_end never came
                    self._emit(held.step, held, {})
            if pre is None or pre[0] != step:  # not decided before the optimizer step
                want = self.decide(step) if probe is None else probe
                if want and self.probing:
                    measured = self._probe_now(step, model) or measured
        except Exception as exc:  # never break training; the step's health still goes out
            self._fail(f"step {step}", exc)
        try:
            metrics = None if values is None else self._emit(step, measured, values, rl=rl)
            self.schedule.step_ended(now=time.monotonic())
            return metrics
        except Exception as exc:  # never break training
            self._fail(f"step {step}", exc)
            return None
        finally:
            if self._prefix is not None:
                self._prefix.release()  # the weights changed: the states are stale

    def before_optimizer_step(self, step: int, model: nn.Module | None = None) -> None:
        """Call after the backward of optimizer step ``step``, before ``optimizer.step()``.

        Probes now when scheduled (the same decision, vote and commit as
        :meth:`step_end`, so every rank probes on the same steps), starting
        from the training forward's hidden states below the lowest probed
        block when they still match the weights; ``.grad`` is left untouched.
        The measurement is held until :meth:`step_end` of the same step,
        which sends it with the step's health and returns its metrics without
        probing again. Repeated calls for one step (several optimizers) probe once.
        Sharded models (FSDP2, ZeRO-3) are probed by :meth:`step_end` as
        before: this call does nothing for them.
        """
        if (
            not self.enabled
            or not self.probing
            or (self._pre_step is not None and self._pre_step[0] == step)
        ):
            return
        try:
            target = model if model is not None else self._model
            if target is None or sharded_parameters(target):
                return  # the same on every rank: step_end decides and probes
            want = self.decide(step)
            self._pre_step = (step, want)
            if want and self.probing:
                self._held = self._probe_now(step, model, before_step=True)
        except Exception as exc:  # never break training
            self._fail(f"step {step}", exc)

    def decide(self, step: int) -> bool:
        """Whether to probe after optimizer step ``step``: the schedule's answer, agreed.

        In a distributed job with the time budget this is a collective (one
        tiny vote, every rank at every step); a fixed schedule needs none. An
        adapter that needs to know before :meth:`step_end` (e.g. to read the
        loss only on probe steps) calls it and passes the answer as ``probe``.
        """
        if not self.enabled or not self.probing:
            return False
        if self._pre_step is not None and self._pre_step[0] == step:
            return self._pre_step[1]  # decided (and voted) before the optimizer step
        try:
            want = self.schedule.should_probe(step)
            if self._agreement is None or self.schedule.same_on_every_rank:
                return want
            verdict = self._vote(want)
            return verdict is not None and verdict.go
        except Exception as exc:  # never break training
            self._fail(f"step {step}", exc)
            return False

    def _probe_now(
        self, step: int, model: nn.Module | None, *, before_step: bool = False
    ) -> Measured | None:
        """Probe at ``step``, on every rank together in a distributed job (``before_step``:
        before the optimizer step, from the training forward's hidden states)."""
        if self._agreement is not None:
            return self._agreed_probe(step, model, before_step=before_step)
        plan = self._prepare(model, before_step=before_step)
        if plan is None:
            return None
        return self._measure(step, plan)

    # ------------------------------------------------------------------ distributed

    def _agreed_probe(
        self, step: int, model: nn.Module | None, *, before_step: bool = False
    ) -> Measured | None:
        """Probe on every rank or on none (all ranks decided to probe at ``step``).

        Every rank first checks what it can before any collective (a batch,
        the model, the sample), then the ranks vote: the probe, whose forward
        gathers sharded weights, starts on all ranks or on none. A failure
        since the last vote is carried by this vote.
        """
        plan = None
        if not self._local_failure:
            try:
                plan = self._prepare(model, before_step=before_step)
            except Exception as exc:  # reported by the vote below
                self._fail(f"step {step}", exc)
        verdict = self._vote(plan is not None, commit=True)
        if plan is None or verdict is None or not verdict.go:
            return None
        return self._measure(step, plan)

    def _vote(self, yes: bool, *, commit: bool = False) -> Verdict | None:
        """Every rank's vote (``commit``: before a probe); None when the monitor is off now."""
        agreement = self._agreement
        if agreement is None:
            return None
        try:
            cast = agreement.commit if commit else agreement.vote
            verdict = cast(yes, failed=self._local_failure)
        except Exception as exc:  # a rank that does not vote in time: stop voting here
            self._agreement = None
            self._disable_here(
                f"the ranks' vote (no answer within agreement_timeout_s="
                f"{self.config.agreement_timeout_s:g} s?)",
                exc,
            )
            return None
        if verdict.failed_rank is None:
            return verdict
        failed_here, self._local_failure = self._local_failure, False
        if self.config.on_error == "continue":
            return verdict
        if not failed_here:  # a rank that failed has said why already
            self._warn_once(
                "peer-failure",
                f"inversion-monitor failed on rank {verdict.failed_rank}; its probe is off on "
                "every rank, the health records go on and training continues",
            )
        self._stop_probing()
        return None

    def _disable_here(self, where: str, exc: BaseException) -> None:
        """Switch off on this rank only (the ranks can no longer agree)."""
        self._report(
            f"error:{type(exc).__name__}",
            where,
            exc,
            ", the health records go on and the probe is off on this rank",
        )
        self._stop_probing()

    def _stop_probing(self) -> None:
        """The probe is off from now on (its hooks removed); the health records go on."""
        self.probing = False
        self.detach()

    def probe(
        self,
        step: int,
        model: nn.Module | None = None,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
    ) -> dict[str, float] | None:
        """Probe the last captured batch now and send the record; returns the metrics
        (None if no batch).

        With sharded weights the probe is a collective: call it on every rank.
        """
        plan = self._prepare(model)
        if plan is None:
            return None
        measured = self._measure(step, plan)
        return self._emit(step, measured, step_health(loss=loss, learning_rate=learning_rate))

    def _prepare(self, model: nn.Module | None, *, before_step: bool = False) -> ProbePlan | None:
        """This rank's batch, model and sample (no collective); None: nothing to probe.

        ``before_step``: called before the optimizer step, so the training
        forward's hidden states are offered to the probe (it checks them again).
        """
        model = model if model is not None else self._model
        batch = self._capture.latest if self._capture is not None else None
        if model is None or batch is None:
            reason = self._capture.skipped_reason if self._capture is not None else None
            self._warn_once(
                "no-batch",
                "inversion-monitor has no training batch to probe yet"
                + (f" ({reason})" if reason else "")
                + ": it captures input_ids of the model's training forward",
            )
            return None
        start = probe_clock(model)  # the training step's queued GPU work is not the probe's
        resolved = resolve_model(model)  # a refusal is known here, before any collective
        if (packing := self._packing(resolved.config, batch)) is not None:
            self._warn_once("packed-attention", packing)
        batch = batch.unpacked()  # packed documents probed as separate rows
        positions = self.sampler.sample(batch.target_mask())
        prefix = self._prefix.latest if self._prefix is not None and before_step else None
        note = self._prefix.skipped_reason if self._prefix is not None else self._prefix_note
        if not before_step:
            note = "probed after the optimizer step (no before_optimizer_step call)"
        # the autocast the training forward ran under (read in the lowest probed block)
        precision = self._prefix.precision if self._prefix is not None else None
        return ProbePlan(
            model,
            batch,
            positions,
            time.perf_counter() - start,
            prefix=prefix,
            prefix_note=note,
            precision=precision,
        )

    def _measure(self, step: int, plan: ProbePlan) -> Measured:
        """Run the probe on ``plan`` (collective when weights are sharded); account for it."""
        measured = measure(step, plan, self.config)
        self.schedule.probe_done(seconds=measured.seconds)
        self.probes += 1
        self.last_stats, self.last_result = measured.stats, measured.result
        self.last_batch = measured.batch
        return measured

    def _emit(
        self,
        step: int,
        measured: Measured | None,
        health: Mapping[str, float],
        *,
        rl: RLStats | None = None,
    ) -> dict[str, float] | None:
        """Send step ``step``'s record (health, and ``measured`` when the probe ran) to
        every sink; returns the trainer's metrics of a probe record."""
        record = TrainingRecord(
            run_id=self.run_id,
            run_name=self.run_name,
            rank=self.rank,
            step=step,
            health=health,
            kind=self.kind,
            rl=rl,
        )
        if measured is not None:
            record = replace(
                record,
                stats=measured.stats,
                probe_seconds=measured.seconds,
                components=measured.components,
                samples=token_samples(measured.result, self.config.token_samples),
                prefix=measured.prefix,
                precision=measured.result.precision,
            )
        for sink in self.sinks:
            sink.emit(record)
        return self._trainer_log.take()

    # ------------------------------------------------------------------ sinks

    def _model_type(self) -> str:
        config = getattr(self._model, "config", None)
        return str(getattr(config, "model_type", "")) if config is not None else ""

    # ------------------------------------------------------------------ failure policy

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(message)
        warnings.warn(message, MonitorWarning, stacklevel=3)

    def report_failure(self, where: str, exc: BaseException) -> None:
        """An adapter's own failure outside the probe (e.g. reading the trainer's health
        values): counted and warned once; the probe and the health records go on."""
        self._report(
            f"error:{type(exc).__name__}:{where}", where, exc, " and so does the monitor without it"
        )

    def _report(self, key: str, where: str, exc: BaseException, outcome: str) -> None:
        """Count a failure, warn once per ``key`` (``outcome`` follows "training continues")."""
        self.errors += 1
        self._warn_once(
            key,
            f"inversion-monitor failed at {where} ({type(exc).__name__}: {exc}); training "
            f"continues{outcome}",
        )
        logger.debug("inversion-monitor failure", exc_info=exc)

    def _fail(self, where: str, exc: BaseException) -> None:
        distributed = self._agreement is not None
        if self.config.on_error == "continue":
            action = "keeps trying"
        else:
            action = "stops probing on every rank" if distributed else "stops probing"
            action += " (the health records go on)"
        self._report(f"error:{type(exc).__name__}", where, exc, f" and the monitor {action}")
        if self.config.on_error != "disable":
            return
        if distributed:  # the next vote tells the other ranks; all stop probing together
            self._local_failure = True
            self.detach()
        else:
            self._stop_probing()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Plain values: run identity, sampler and schedule state."""
        return {
            "version": __version__,
            "run_id": self.run_id,
            "run_name": self.run_name,
            "probes": self.probes,
            "measured_overhead": self.schedule.overhead,
            "sampler": self.sampler.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the same run id (the server continues the run), sampler and schedule."""
        self.run_id = str(state.get("run_id", self.run_id))
        self.run_name = str(state.get("run_name", self.run_name))
        self.probes = int(state.get("probes", 0))
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
