"""InversionMonitor in a custom loop: capture, probe, sinks, failure policy, state."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.training_monitor import InversionMonitor, MonitorWarning
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus


@pytest.fixture
def batch(tokenizer):
    rows = tokenized_corpus(tokenizer, 4, seed=3, max_length=48)
    return causal_lm_collator(tokenizer)(rows)


def train_steps(model, monitor, batch, steps, *, lr=1e-2):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr) if trainable else None
    out = []
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        out.append(monitor.step_end(step, model, loss=loss.item()))
    return out


def test_probes_the_captured_batch_and_matches_the_core_api(make_model, batch):
    model = make_model("llama", num_layers=2).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, layers=[0, -1]))
    monitor.attach(model)
    metrics = train_steps(model, monitor, batch, 1)[0]
    result = monitor.last_result
    expected = logit_gradient_norms(
        model,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        positions=result.positions,
        layers=[0, -1],
    )
    torch.testing.assert_close(result.score, expected.score)
    assert metrics["inversion/n"] == len(result) == 64
    assert set(result.positions[:, 0].tolist()) <= {0, 1, 2, 3}
    monitor.close()


def test_eval_and_no_grad_forwards_are_not_captured(make_model, batch):
    model = make_model("gpt2", num_layers=1)
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1))
    monitor.attach(model)
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    with pytest.warns(MonitorWarning, match="no training batch to probe yet"):
        assert monitor.step_end(1, model) is None
    assert monitor.enabled  # nothing failed: it just had nothing to probe


def test_logits_to_keep_restricts_probed_positions(make_model, tokenizer):
    model = make_model("qwen2", num_layers=1).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=200))
    monitor.attach(model)
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, logits_to_keep=6)
    monitor.step_end(1, model)
    t = monitor.last_result.positions[:, 1]
    assert sorted(set(t.tolist())) == [14, 15, 16, 17, 18]  # t >= 20 - 6, t + 1 < 20


def test_lora_and_frozen_models_match_the_core_api(make_model, batch):
    import peft

    lora = peft.get_peft_model(
        make_model("llama", num_layers=2),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).train()
    frozen = make_model("gpt_neox", num_layers=2).train().requires_grad_(False)
    for model in (lora, frozen):
        monitor = InversionMonitor(MonitorConfig(every_n_steps=1, layers=[0, 1]))
        monitor.attach(model)
        train_steps(model, monitor, batch, 2)
        unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
        expected = logit_gradient_norms(
            unwrapped,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            positions=monitor.last_result.positions,
            layers=[0, 1],
        )
        torch.testing.assert_close(monitor.last_result.score, expected.score)
        assert monitor.errors == 0


def test_probe_leaves_rng_and_grads_untouched(make_model, batch):
    model = make_model("llama", num_layers=2).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1))
    monitor.attach(model)
    model(**batch).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert monitor.step_end(1, model) is not None
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_failure_warns_once_and_disables(make_model, batch):
    model = make_model("llama", num_layers=2).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, layers=[5]))
    monitor.attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = train_steps(model, monitor, batch, 3)
    assert results == [None, None, None]
    failures = [w for w in caught if issubclass(w.category, MonitorWarning)]
    assert len(failures) == 1 and "layer 5 is out of range" in str(failures[0].message)
    assert "stops probing (the health records go on)" in str(failures[0].message)
    assert monitor.enabled and not monitor.probing and monitor.errors == 1
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())  # hook removed


def test_a_probe_failing_on_a_diverged_model_names_its_nan_weights(make_model, batch):
    """A NaN update (as a NaN batch makes) gives the probe NaN Gram matrices, whose
    eigensolver fails as "ill-conditioned"; the warning says instead that the weights
    diverged, naming them, with the solver's error kept as the cause."""
    model = make_model("llama", num_layers=2).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1))
    monitor.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    assert monitor.step_end(1, model) is not None  # a healthy first probe
    model(**batch).loss.backward()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.grad[0, 0] = float("nan")
    optimizer.step()  # one NaN weight, in the probed block
    with pytest.warns(MonitorWarning) as caught:
        assert monitor.step_end(2, model) is None
    message = str(caught[0].message)
    assert "DivergedModelError: the model's weights hold NaN or inf at step 2" in message
    assert "(model.layers.1.self_attn.q_proj.weight)" in message
    assert "the probe's own error:" in message and "stops probing" in message
    assert monitor.errors == 1 and not monitor.probing
    assert monitor.step_end(3, model) is None  # training goes on, no second warning


def test_continue_policy_keeps_trying(make_model, batch):
    model = make_model("llama", num_layers=2).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, layers=[5], on_error="continue"))
    monitor.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, monitor, batch, 3)
    assert monitor.enabled and monitor.errors == 3


def test_jsonl_records_are_strict_json(make_model, batch, tmp_path):
    path = tmp_path / "out" / "r.jsonl"
    model = make_model("gpt2", num_layers=1).train()
    monitor = InversionMonitor(
        MonitorConfig(every_n_steps=2, jsonl_path=str(path), token_samples=5, per_token_type=True),
        rank=1,
        world_size=2,
    )
    monitor.attach(model)
    train_steps(model, monitor, batch, 4)
    monitor.close()
    lines = (tmp_path / "out" / "r.rank1.jsonl").read_text().splitlines()
    records = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) for line in lines
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one health record per step
    assert [r["probed"] for r in records] == [False, True, False, True]
    assert all(isinstance(r["loss"], float) for r in records)
    probed = [r for r in records if r["probed"]]
    assert probed[0]["rank"] == 1 and len(probed[0]["samples"]) == 5
    assert probed[0]["spearman_per_token_type"] is not None
    assert "spearman" not in records[0]


def test_custom_loop_sends_every_steps_health_and_a_nan_loss_as_nan(make_model, batch, tmp_path):
    path = tmp_path / "r.jsonl"
    model = make_model("llama", num_layers=1).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1000, jsonl_path=str(path)))
    monitor.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    sent = []
    for step in range(1, 4):
        loss = model(**batch).loss
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad()
        value = float("nan") if step == 3 else loss.item()
        health = {"kl": 0.01 * step, "completion_length_mean": 12.0}
        assert monitor.step_end(step, model, loss=value, grad_norm=norm, learning_rate=1e-2,
                                health=health) is None  # fmt: skip
        sent.append((value, norm))
    monitor.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["probed"] for r in rows)
    assert [r["grad_norm"] for r in rows] == [norm for _, norm in sent]
    assert [r["loss"] for r in rows[:2]] == [loss for loss, _ in sent[:2]]
    assert rows[2]["loss"] == "nan" and rows[2]["nonfinite_fields"] == ["loss"]
    assert [r["kl"] for r in rows] == [0.01, 0.02, 0.03]
    assert rows[0]["learning_rate"] == 1e-2 and rows[0]["completion_length_mean"] == 12.0
    assert monitor.probes == 0


@pytest.mark.parametrize("on_error", ["continue", "disable"])
def test_a_failing_probe_never_costs_the_steps_health_record(make_model, batch, tmp_path, on_error):
    path = tmp_path / "r.jsonl"
    model = make_model("llama", num_layers=1).train()
    config = MonitorConfig(every_n_steps=1, layers=[5], on_error=on_error, jsonl_path=str(path))
    monitor = InversionMonitor(config)  # the model has 1 layer: every probe fails
    monitor.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, monitor, batch, 3)
    monitor.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["probed"]) for r in rows] == [(1, False), (2, False), (3, False)]
    assert all(isinstance(r["loss"], float) for r in rows)
    # "continue" tries (and fails) every step; "disable" stops probing after the first
    assert monitor.errors == (3 if on_error == "continue" else 1)
    assert monitor.probing is (on_error == "continue")


def test_a_bad_health_key_is_reported_once_and_training_goes_on(make_model, batch):
    model = make_model("llama", num_layers=1).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1000))
    monitor.attach(model)
    with pytest.warns(MonitorWarning, match=r"health\['gradnorm'\] is not a health field"):
        assert monitor.step_end(1, model, health={"gradnorm": 1.0}) is None
    assert monitor.enabled and not monitor.probing  # on_error="disable": health goes on


def test_disabled_config_does_nothing(make_model, batch):
    model = make_model("gpt2", num_layers=1).train()
    monitor = InversionMonitor(MonitorConfig.from_env({"INVERSION_MONITOR_DISABLED": "1"}))
    monitor.attach(model)
    assert train_steps(model, monitor, batch, 2) == [None, None]
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_state_dict_resumes_run_and_sampler(make_model, batch):
    model = make_model("llama", num_layers=1).train()
    first = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=8))
    first.attach(model)
    train_steps(model, first, batch, 2)
    state = first.state_dict()
    resumed = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=8))
    resumed.load_state_dict(state)
    resumed.attach(model)
    model(**batch)  # both monitors capture this training forward
    first.step_end(3, model)
    resumed.step_end(3, model)
    assert resumed.run_id == first.run_id
    assert torch.equal(resumed.last_result.positions, first.last_result.positions)


def test_rank_validation():
    with pytest.raises(ValueError, match="rank < world_size"):
        InversionMonitor(MonitorConfig(), rank=2, world_size=2)


def test_an_adapters_own_failure_is_warned_once_and_stops_nothing(make_model, batch):
    model = make_model("llama", num_layers=1).train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=8))
    monitor.attach(model)
    with pytest.warns(MonitorWarning, match="reading the trainer's health values") as caught:
        for _ in range(2):
            monitor.report_failure("reading the trainer's health values", ValueError("boom"))
    assert len([w for w in caught if issubclass(w.category, MonitorWarning)]) == 1
    assert monitor.enabled and monitor.probing and monitor.errors == 2
    assert train_steps(model, monitor, batch, 1)[0] is not None  # the probe still runs
    monitor.close()
