"""InversionTrainerCallback in real Hugging Face Trainer runs on tiny models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from inversion_monitor.callbacks import InversionTrainerCallback
from tests.trainers import hf_trainer, weights


def test_logs_reach_history_every_probed_step(tmp_path):
    callback = InversionTrainerCallback(every_n_steps=5, tokens_per_probe=32)
    trainer = hf_trainer(tmp_path, callbacks=[callback])
    trainer.train()
    probed = [e for e in trainer.state.log_history if "inversion/spearman" in e]
    assert [e["step"] for e in probed] == [5, 10, 15, 20, 25, 30]
    # the trainer's own logs survive at the steps where a probe is logged too
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [10, 20, 30]
    assert not any("loss" in e for e in probed)
    for entry in probed:
        assert entry["inversion/n"] == 32
        assert -1.0 <= entry["inversion/spearman"] <= 1.0
        assert (
            entry["inversion/ci_low"] <= entry["inversion/spearman"] <= entry["inversion/ci_high"]
        )
        assert entry["inversion/entropy_mean"] > 0
    assert callback.monitor is None  # closed at train end
    assert callback.resume_state["probes"] == 6


@pytest.mark.parametrize(
    ("arch", "prefix"),
    [
        ("llama", "captured"),  # probed before the optimizer step, from the last micro-batch
        ("gpt2", "recomputed: dropout is active (Dropout, p=0.1)"),
    ],
)
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, arch, prefix):
    plain = hf_trainer(tmp_path / "a", arch=arch, max_steps=12, grad_accum=2, logging_steps=1)
    plain.train()
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(
        every_n_steps=1, layers=[0, -1], tokens_per_probe=16, jsonl_path=str(path)
    )
    monitored = hf_trainer(
        tmp_path / "b",
        arch=arch,
        max_steps=12,
        grad_accum=2,
        logging_steps=1,
        callbacks=[callback],
    )
    monitored.train()
    assert callback.resume_state["probes"] == 12  # once per optimizer step, not per micro-batch
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(r["probed"] for r in records)
    assert {r["prefix"] for r in records} == {prefix}
    losses = [(e["step"], e["loss"]) for e in plain.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert [(e["step"], e["loss"]) for e in monitored.state.log_history if "loss" in e] == losses
    a, b = weights(plain.model), weights(monitored.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_jsonl_sink_and_budget_schedule(tmp_path):
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(jsonl_path=str(path), overhead_budget=0.5)
    hf_trainer(tmp_path, callbacks=[callback], max_steps=10).train()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))  # one health record a step
    probed = [r for r in records if r["probed"]]
    assert probed and probed[0]["step"] == 1
    assert all(r["n"] == 64 and r["run_id"] == records[0]["run_id"] for r in probed)
    assert all(isinstance(c["layer"], int) for c in probed[0]["components"])


@pytest.mark.parametrize(("grad_accum", "logging_steps"), [(2, 1), (1, 4)])
def test_one_health_record_per_step_with_the_values_the_trainer_logs(
    tmp_path, grad_accum, logging_steps
):
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(every_n_steps=10_000, jsonl_path=str(path))
    trainer = hf_trainer(
        tmp_path,
        callbacks=[callback],
        max_steps=12,
        grad_accum=grad_accum,
        logging_steps=logging_steps,
        max_grad_norm=0.5,  # clipping happens: the record keeps the norm before it
        lr_scheduler_type="linear",
    )
    trainer.train()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert not any(r["probed"] for r in records) and callback.resume_state["probes"] == 0
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == list(range(logging_steps, 13, logging_steps))
    by_step = {r["step"]: r for r in records}
    for entry in logged:
        # the trainer logs the mean loss of the steps since its last log, the last step's
        # grad norm and learning rate
        window = [
            by_step[s]["loss"] for s in range(entry["step"] - logging_steps + 1, entry["step"] + 1)
        ]
        assert sum(window) / len(window) == pytest.approx(entry["loss"], rel=1e-6)
        assert by_step[entry["step"]]["grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-6)
        assert by_step[entry["step"]]["learning_rate"] == entry["learning_rate"]
    assert any(r["grad_norm"] > 0.5 for r in records)  # before clipping
    rates = [r["learning_rate"] for r in records]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]  # the linear decay


def test_monitor_errors_never_stop_training(tmp_path):
    callback = InversionTrainerCallback(every_n_steps=1, layers=[7])  # the model has 2 layers
    trainer = hf_trainer(tmp_path, callbacks=[callback], max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "inversion-monitor failed" in str(w.message)]
    assert len(messages) == 1 and "layer 7 is out of range" in messages[0]
    assert trainer.state.global_step == 5
    assert not any("inversion/spearman" in e for e in trainer.state.log_history)


def test_constructor_validates_overrides():
    with pytest.raises(
        ValueError, match="every_n_steps: Input should be greater than or equal to 1"
    ):
        InversionTrainerCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="unknown_field: Extra inputs are not permitted"):
        InversionTrainerCallback(unknown_field=1)


def test_state_round_trip_drops_the_token():
    callback = InversionTrainerCallback(token="secret", every_n_steps=3, labels={"team": "a"})
    state = callback.state()
    assert "token" not in state["args"]
    restored = InversionTrainerCallback.from_state(state)
    assert restored.config.every_n_steps == 3 and restored.config.labels == {"team": "a"}
