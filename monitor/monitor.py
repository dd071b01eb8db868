"""``InversionMonitor``: the framework-free engine behind every callback.

It owns the configuration, the batch capture, the schedule, the probe, the
statistics and the sinks (the gRPC client, a JSONL file, the trainer's logs).
A framework adapter only calls :meth:`InversionMonitor.attach` when training
starts, :meth:`InversionMonitor.step_end` after every optimizer step, and
:meth:`InversionMonitor.close` at the end.

It never breaks training: any error inside is caught, reported once with a
clear warning, and the monitor disables itself (``on_error="disable"``) or
keeps trying (``"continue"``). It leaves gradients, RNG streams and modes as
it found them (see :mod:`inversion_monitor.probe`).

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

import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from inversion_monitor._version import __version__
from inversion_monitor.capture import BatchCapture, CapturedBatch
from inversion_monitor.config import MonitorConfig
from inversion_monitor.probe import ProbeResult, logit_gradient_norms
from inversion_monitor.sampling import TokenSampler
from inversion_monitor.schedule import ProbeSchedule
from inversion_monitor.stats import InversionStats, inversion_stats, spearman

if TYPE_CHECKING:
    from inversion_monitor.client import DeliveryReport, MonitorClient

logger = logging.getLogger("inversion_monitor")


class MonitorWarning(RuntimeWarning):
    """Something kept the monitor from measuring; training goes on."""


def trainer_metrics(stats: InversionStats, *, probe_seconds: float) -> dict[str, float]:
    """The flat ``inversion/...`` values added to a trainer's logs.

    >>> s = InversionStats.insufficient_sample(n=3, reason="n < 4")
    >>> trainer_metrics(s, probe_seconds=0.5)["inversion/insufficient"]
    1.0
    """
    low, high = stats.ci
    metrics = {
        "inversion/rho": stats.rho,
        "inversion/spearman": stats.spearman,
        "inversion/pearson": stats.pearson,
        "inversion/ci_low": low,
        "inversion/ci_high": high,
        "inversion/n": float(stats.n),
        "inversion/insufficient": float(stats.insufficient),
        "inversion/entropy_mean": stats.entropy_mean,
        "inversion/entropy_p10": stats.entropy_p10,
        "inversion/entropy_p50": stats.entropy_p50,
        "inversion/entropy_p90": stats.entropy_p90,
        "inversion/score_mean": stats.score_mean,
        "inversion/score_p50": stats.score_p50,
        "inversion/probe_seconds": probe_seconds,
    }
    if stats.spearman_per_token_type is not None:
        metrics["inversion/spearman_per_token_type"] = stats.spearman_per_token_type
    return {key: float(value) for key, value in metrics.items()}


class InversionMonitor:
    """Schedules probes of a training model and sends what they measure.

    Args:
        config: a :class:`MonitorConfig` (default: from the environment).
        rank, world_size: this process's place in a distributed job.
        framework: e.g. ``"transformers"``, ``"lightning"``, ``"custom"``.
        default_run_name: used when ``config.run_name`` is unset.

    Use from a custom loop::

        monitor = InversionMonitor(MonitorConfig(endpoint="localhost:50051"))
        monitor.attach(model)
        for step, batch in enumerate(loader, 1):
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
            monitor.step_end(step, model, loss=loss.item())
        monitor.close()
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        framework: str = "custom",
        default_run_name: str | None = None,
    ) -> None:
        self.config = MonitorConfig.from_env() if config is None else config
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
        self.schedule = ProbeSchedule(
            every_n_steps=self.config.every_n_steps,
            overhead_budget=self.config.overhead_budget,
            first_step=self.config.first_step,
        )
        self.sampler = TokenSampler(
            self.config.tokens_per_probe,
            max_sequences=self.config.sequences_per_probe,
            seed=self.config.seed + rank,
        )
        self.last_stats: InversionStats | None = None
        self.last_result: ProbeResult | None = None
        # the batch the last probe measured: last_result.positions index into it
        self.last_batch: CapturedBatch | None = None
        self.probes = 0
        self.errors = 0
        self._capture: BatchCapture | None = None
        self._model: nn.Module | None = None
        self._client: MonitorClient | None = None
        self._jsonl: Any = None
        self._warned: set[str] = set()
        self._agreed = False

    # ------------------------------------------------------------------ lifecycle

    def attach(self, model: nn.Module) -> None:
        """Start capturing ``model``'s training batches (idempotent per model)."""
        if not self.enabled:
            return
        self._agree_on_run_id()
        try:
            if self._model is model and self._capture is not None:
                return
            self.detach()
            self._model = model
            self._capture = BatchCapture(model)
            self.schedule.start(now=time.monotonic())
        except Exception as exc:  # never break training
            self._fail("attach", exc)

    def _agree_on_run_id(self) -> None:
        """Every rank of a distributed job reports under rank 0's run id.

        A collective: the adapters call :meth:`attach` on every rank. Skipped
        when the run id was configured (then it is already the same).
        """
        if self.world_size < 2 or self.config.run_id or self._agreed:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            shared = [self.run_id, self.run_name]
            dist.broadcast_object_list(shared, src=0)
            self.run_id, self.run_name = str(shared[0]), str(shared[1])
        self._agreed = True

    def detach(self) -> None:
        """Remove the capture hook (sinks stay open)."""
        if self._capture is not None:
            self._capture.remove()
        self._capture = None
        self._model = None

    def close(self, timeout_s: float = 10.0) -> DeliveryReport | None:
        """Detach, flush and close the sinks; returns the client's delivery report."""
        self.detach()
        report = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._client is not None:
            try:
                report = self._client.close(timeout_s=timeout_s)
            except Exception as exc:
                self._fail("close", exc)
            self._client = None
        return report

    # ------------------------------------------------------------------ per step

    def step_end(
        self,
        step: int,
        model: nn.Module | None = None,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
        probe: bool | None = None,
    ) -> dict[str, float] | None:
        """Call after each optimizer step; probes when scheduled.

        ``probe`` overrides the schedule's decision for this step (a distributed
        adapter passes one agreed across ranks); None asks the schedule.
        Returns the ``inversion/...`` metrics when it probed, else None.
        """
        if not self.enabled:
            return None
        try:
            metrics = None
            if self.schedule.should_probe(step) if probe is None else probe:
                metrics = self.probe(step, model, loss=loss, learning_rate=learning_rate)
            self.schedule.step_ended(now=time.monotonic())
            return metrics
        except Exception as exc:  # never break training
            self._fail(f"step {step}", exc)
            return None

    def probe(
        self,
        step: int,
        model: nn.Module | None = None,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
    ) -> dict[str, float] | None:
        """Probe the last captured batch now; returns the metrics (None if no batch)."""
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
        start = time.perf_counter()
        batch = batch.unpacked()  # packed documents probed as separate rows
        positions = self.sampler.sample(batch.target_mask())
        result = logit_gradient_norms(
            model,
            batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            positions=positions,
            layers=self.config.layers,
            projections=self.config.projections,
            norm=self.config.norm,
            chunk_tokens=self.config.chunk_tokens,
        )
        stats = inversion_stats(
            result.entropy,
            result.score,
            method=self.config.method,
            per_token_type=self.config.per_token_type,
            tokens=result.tokens if self.config.per_token_type else None,
        )
        components = self._components(result) if self.config.per_component_stats else None
        seconds = time.perf_counter() - start
        self.schedule.probe_done(seconds=seconds)
        self.probes += 1
        self.last_stats, self.last_result, self.last_batch = stats, result, batch
        self._emit(
            step,
            stats=stats,
            result=result,
            components=components,
            seconds=seconds,
            loss=loss,
            learning_rate=learning_rate,
        )
        return trainer_metrics(stats, probe_seconds=seconds)

    # ------------------------------------------------------------------ sinks

    def _components(self, result: ProbeResult) -> list[dict[str, Any]]:
        out = []
        enough = len(result) >= 4 and len(result.norms) > 1
        for (layer, projection), values in result.norms.items():
            item: dict[str, Any] = {
                "layer": layer,
                "projection": projection,
                "score_mean": float(values.mean()) if len(result) else math.nan,
            }
            if enough:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    item["spearman"] = float(spearman(result.entropy, values))
            out.append(item)
        return out

    def _samples(self, result: ProbeResult) -> list[tuple[float, float, int]] | None:
        count = min(self.config.token_samples, len(result))
        if count == 0:
            return None
        return [
            (float(result.entropy[i]), float(result.score[i]), int(result.tokens[i]))
            for i in range(count)
        ]

    def _emit(
        self,
        step: int,
        *,
        stats: InversionStats,
        result: ProbeResult,
        components: list[dict[str, Any]] | None,
        seconds: float,
        loss: float | None,
        learning_rate: float | None,
    ) -> None:
        samples = self._samples(result)
        if self.config.endpoint:
            client = self._ensure_client(result)
            client.log(
                step,
                stats,
                loss=loss,
                learning_rate=learning_rate,
                components=components,
                samples=samples,
                probe_seconds=seconds,
            )
        if self.config.jsonl_path:
            record = {
                "run_id": self.run_id,
                "run_name": self.run_name,
                "rank": self.rank,
                "step": step,
                "wall_time": time.time(),
                "probe_seconds": seconds,
                "loss": loss,
                "learning_rate": learning_rate,
                **{k: v for k, v in stats.to_dict().items() if k != "extra"},
                "components": components,
                "samples": samples,
            }
            line = json.dumps(_json_safe(record), allow_nan=False)
            self._jsonl_file().write(line + "\n")
            self._jsonl_file().flush()

    def _jsonl_file(self) -> Any:
        if self._jsonl is None:
            path = Path(str(self.config.jsonl_path))
            if self.world_size > 1:
                path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = path.open("a", encoding="utf-8")
        return self._jsonl

    def _ensure_client(self, result: ProbeResult) -> MonitorClient:
        if self._client is None:
            from inversion_monitor.client import MonitorClient

            model_type = ""
            config = getattr(self._model, "config", None)
            if config is not None:
                model_type = str(getattr(config, "model_type", ""))
            self._client = MonitorClient(
                str(self.config.endpoint),
                self.run_name,
                project=self.config.project,
                labels=self.config.labels,
                run_id=self.run_id,
                rank=self.rank,
                world_size=self.world_size,
                framework=self.framework,
                model_type=model_type,
                config=self.config.public_dict(),
                token=self.config.token,
                tls=self.config.tls,
                spool_dir=self.config.spool_dir,
            )
        return self._client

    # ------------------------------------------------------------------ failure policy

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(message)
        warnings.warn(message, MonitorWarning, stacklevel=3)

    def _fail(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        action = "disabled itself" if self.config.on_error == "disable" else "keeps trying"
        self._warn_once(
            f"error:{type(exc).__name__}",
            f"inversion-monitor failed at {where} ({type(exc).__name__}: {exc}); training "
            f"continues and the monitor {action}",
        )
        logger.debug("inversion-monitor failure", exc_info=exc)
        if self.config.on_error == "disable":
            self.enabled = False
            self.detach()

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


def _json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null, tuples lists, tensors lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
