"""Real trainers under bf16 autocast on CPU (HF ``bf16=True``, Lightning ``bf16-mixed``, a
custom loop's ``torch.autocast``): the probe starts from the captured prefix, runs under the
training forward's autocast, and equals the brute force under the same autocast (the bound
of tests/test_probe_autocast.py), checked at probe time, before the optimizer step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from transformers import TrainerCallback

from inversion_monitor.callbacks import InversionLightningCallback, InversionTrainerCallback
from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.training_monitor import InversionMonitor
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.toy.models import tiny_causal_lm
from tests.lightning_runs import TinyCausalLM, train_loader, trainer
from tests.test_probe_autocast import assert_within_bf16_bound
from tests.trainers import hf_trainer

LAYERS = [0, -1]


def _check(model: torch.nn.Module, monitor: InversionMonitor | None, step: int) -> float:
    """The probe of ``step`` against the brute force under bf16 autocast (weights unchanged)."""
    assert monitor is not None
    result, batch = monitor.last_result, monitor.last_batch
    assert result is not None and batch is not None
    assert (result.prefix, result.precision) == ("captured", "bf16-autocast")
    assert bool(torch.isfinite(result.score).all()) and bool(torch.isfinite(result.entropy).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_norms(
            model,
            batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            positions=result.positions,
            layers=LAYERS,
        )
    return assert_within_bf16_bound(model, result, ref)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _HFCheck(TrainerCallback):
    """Runs after the monitor's on_pre_optimizer_step (callbacks run in order)."""

    def __init__(self, callback: InversionTrainerCallback) -> None:
        self.callback = callback
        self.checked: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.checked.append(_check(kwargs["model"], self.callback.monitor, state.global_step))


def test_hf_trainer_bf16_probes_from_the_captured_prefix_under_autocast(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(
        every_n_steps=1, layers=LAYERS, tokens_per_probe=16, jsonl_path=str(path)
    )
    check = _HFCheck(callback)
    run = hf_trainer(tmp_path, max_steps=3, bf16=True, callbacks=[callback, check])
    run.train()
    assert len(check.checked) == 3
    records = _records(path)
    assert {r["prefix"] for r in records} == {"captured"}
    assert {r["probe_precision"] for r in records} == {"bf16-autocast"}


class _LightningCheck(pl.Callback):
    def __init__(self, callback: InversionLightningCallback) -> None:
        self.callback = callback
        self.checked: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = int(trainer.global_step) + 1
        self.checked.append(_check(pl_module.model, self.callback.monitor, step))


def test_lightning_bf16_mixed_probes_from_the_captured_prefix_under_autocast(
    tmp_path: Path,
) -> None:
    path = tmp_path / "records.jsonl"
    callback = InversionLightningCallback(
        every_n_steps=1, layers=LAYERS, tokens_per_probe=16, jsonl_path=str(path)
    )
    check = _LightningCheck(callback)
    run = trainer(None, callbacks=[callback, check], max_steps=3, precision="bf16-mixed")
    run.fit(TinyCausalLM("llama"), train_loader(3))
    assert len(check.checked) == 3
    records = _records(path)
    assert {r["prefix"] for r in records} == {"captured"}
    assert {r["probe_precision"] for r in records} == {"bf16-autocast"}


def test_custom_loop_with_torch_autocast(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    config = MonitorConfig(
        every_n_steps=1, layers=LAYERS, tokens_per_probe=16, jsonl_path=str(path)
    )
    monitor = InversionMonitor(config)
    model = tiny_causal_lm("qwen2", num_layers=3).train()
    monitor.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in (1, 2):
        ids = torch.randint(4, 100, (4, 24), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monitor.before_optimizer_step(step, model)  # outside the autocast block
        _check(model, monitor, step)
        optimizer.step()
        optimizer.zero_grad()
        monitor.step_end(step, model, loss=float(loss.detach()))
    # a loop that probes inside its autocast block: no dtype error, same precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monitor.before_optimizer_step(3, model)
    _check(model, monitor, 3)
    monitor.step_end(3, model, loss=float(loss.detach()))
    monitor.close()
    records = _records(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {r["prefix"] for r in records} == {"captured"}
    assert {r["probe_precision"] for r in records} == {"bf16-autocast"}
