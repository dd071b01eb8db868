"""The probe from the training forward's hidden states (PrefixCapture): exact, or recomputed
with the reason; the engine probing before the optimizer step leaves training as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.training_monitor import InversionMonitor
from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.probe.prefix_capture import PrefixCapture
from inversion_monitor.toy.models import tiny_causal_lm, tiny_config

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(4, 100, (3, 20), generator=GEN)
MASK = torch.ones_like(IDS)
MASK[1, :4] = 0  # left padding in one row
POSITIONS = torch.tensor([[0, 5], [1, 7], [2, 18], [0, 12], [1, 10], [2, 0]])


def _trained_forward(model: torch.nn.Module, layer: int, **inputs: Any) -> PrefixCapture:
    """A training forward and backward with a capture of block ``layer``'s input."""
    capture = PrefixCapture(model, layer)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return capture


def _max_rel(a: ProbeResult, b: ProbeResult) -> float:
    worst = float(((a.entropy - b.entropy).abs() / b.entropy.abs().clamp_min(1e-12)).max())
    for component, expected in b.norms.items():
        got = a.norms[component]
        worst = max(worst, float(((got - expected).abs() / expected.abs()).max()))
    return worst


@pytest.mark.parametrize(
    ("arch", "layers", "projections", "path"),
    [
        ("llama", [-1], ("q", "o"), "rank_one"),
        ("llama", [-1], ("q", "k", "v", "o"), "last_block"),
        ("llama", [0, -1], ("q", "k", "v", "o"), "general"),
        ("llama", [1, -1], ("q", "k", "v", "o"), "general"),
        ("gpt_neox", [1, -1], ("q", "v"), "general"),
        ("qwen2", [-1], ("q", "k", "v", "o"), "last_block"),
    ],
)
def test_captured_prefix_gives_the_recomputed_values(
    arch: str, layers: list[int], projections: tuple[str, ...], path: str
) -> None:
    model = tiny_causal_lm(arch, num_layers=4)  # type: ignore[arg-type]
    lowest = min(layer % 4 for layer in layers)
    capture = _trained_forward(model, lowest, input_ids=IDS, attention_mask=MASK)
    kwargs: dict[str, Any] = {
        "attention_mask": MASK,
        "positions": POSITIONS,
        "layers": layers,
        "projections": projections,
    }
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    captured = logit_gradient_norms(model, IDS, prefix=capture.latest, **kwargs)
    recomputed = logit_gradient_norms(model, IDS, **kwargs)
    assert captured.prefix == "captured" and captured.prefix_reason is None
    assert recomputed.prefix == "recomputed" and recomputed.prefix_reason is None
    assert set(captured.paths.values()) == {path}
    assert _max_rel(captured, recomputed) <= 1e-5
    # the probe formed no weight gradient and left .grad as the backward left it
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, grads[name]), name
    assert model.training  # modes as found
    # the values really come from the captured states: shift them and they move
    shifted = dataclasses.replace(capture.latest, hidden=capture.latest.hidden + 0.5)
    moved = logit_gradient_norms(model, IDS, prefix=shifted, **kwargs)
    assert _max_rel(moved, recomputed) > 1e-2
    capture.remove()


def test_prefix_below_the_lowest_probed_block_runs_the_blocks_between() -> None:
    model = tiny_causal_lm("llama", num_layers=4)
    capture = _trained_forward(model, 1, input_ids=IDS)
    captured = logit_gradient_norms(model, IDS, positions=POSITIONS, prefix=capture.latest)
    recomputed = logit_gradient_norms(model, IDS, positions=POSITIONS)
    assert captured.prefix == "captured"
    assert _max_rel(captured, recomputed) <= 1e-5
    higher = logit_gradient_norms(
        model, IDS, positions=POSITIONS, layers=[0, -1], prefix=capture.latest
    )
    assert higher.prefix == "recomputed"
    assert higher.prefix_reason == "the prefix enters block 1, above the lowest probed block"


def test_changed_parameters_and_other_inputs_fall_back_with_the_reason() -> None:
    model = tiny_causal_lm("llama", num_layers=2)
    capture = _trained_forward(model, -1, input_ids=IDS, attention_mask=MASK)
    prefix = capture.latest
    assert prefix is not None

    def reason(ids: torch.Tensor = IDS, **kwargs: Any) -> str | None:
        result = logit_gradient_norms(model, ids, positions=POSITIONS, prefix=prefix, **kwargs)
        assert result.prefix == "recomputed"
        return result.prefix_reason

    assert reason(IDS.clone(), attention_mask=MASK) == (
        "the probed input_ids are not the captured forward's tensor"
    )
    assert reason(attention_mask=None) == (
        "the probed attention_mask differs from the captured forward's"
    )
    positions = torch.arange(20).expand(3, 20)
    assert reason(attention_mask=MASK, position_ids=positions) == (
        "the probed position_ids differ from the captured forward's"
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # any in-place update bumps a version counter
    assert "parameters changed since the training forward" in str(reason(attention_mask=MASK))
    capture.remove()
    assert reason(attention_mask=MASK) == (
        "the capture was removed, so optimizer steps since are unknown"
    )


@pytest.mark.parametrize("fused", [True, False])
def test_an_optimizer_step_makes_the_capture_stale(fused: bool) -> None:
    model = tiny_causal_lm("llama", num_layers=2)
    capture = _trained_forward(model, -1, input_ids=IDS)
    prefix = capture.latest
    assert prefix is not None and prefix.refusal(model, IDS, None, None) is None
    other = torch.nn.Linear(2, 2)
    other(torch.ones(1, 2)).sum().backward()
    torch.optim.AdamW(other.parameters(), fused=fused).step()  # another model's optimizer
    assert capture.latest is prefix and prefix.refusal(model, IDS, None, None) is None
    # a fused AdamW updates the weights in place without bumping version counters
    torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused).step()
    assert capture.latest is None
    assert capture.skipped_reason == "an optimizer stepped since the training forward"
    result = logit_gradient_norms(model, IDS, positions=POSITIONS, prefix=prefix)
    assert result.prefix == "recomputed"
    assert result.prefix_reason == "an optimizer stepped since the training forward"
    capture.remove()


def test_dropout_and_packing_are_not_captured_or_not_used() -> None:
    gpt2 = tiny_causal_lm("gpt2", num_layers=2)  # resid/embd/attn dropout 0.1
    capture = _trained_forward(gpt2, -1, input_ids=IDS)
    assert capture.latest is None
    assert capture.skipped_reason == "dropout is active (Dropout, p=0.1)"
    capture.remove()

    config = tiny_config("llama", num_layers=2)
    config.attention_dropout = 0.1  # no module: a float the attention applies in training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llama = transformers.AutoModelForCausalLM.from_config(config)
    capture = _trained_forward(llama, -1, input_ids=IDS)
    assert capture.skipped_reason is not None
    assert capture.skipped_reason.startswith("attention dropout is active (LlamaAttention.")
    capture.remove()

    model = tiny_causal_lm("llama", num_layers=2)
    capture = PrefixCapture(model, -1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=IDS)
    assert capture.latest is not None  # autocast is captured (tests/test_probe_autocast.py)
    assert capture.latest.precision.enabled
    position_ids = torch.tensor([list(range(8)) + list(range(12))] * 3)  # two documents a row
    model(input_ids=IDS, position_ids=position_ids)
    assert capture.latest is not None
    result = logit_gradient_norms(
        model,
        IDS,
        position_ids=position_ids,
        positions=torch.tensor([[0, 5], [1, 10], [2, 18]]),
        prefix=capture.latest,
    )
    assert result.prefix == "recomputed"
    assert result.prefix_reason == "packed rows are probed one document per row"
    model(input_ids=IDS)
    model.eval()
    model(input_ids=IDS.clone())  # an evaluation forward keeps the training capture
    assert capture.latest is not None and capture.latest.input_ids is IDS
    capture.remove()


def _custom_loop(
    monitor: InversionMonitor | None, *, steps: int = 4, accumulate: int = 1
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A plain training loop (AdamW); the monitor probes before each optimizer step."""
    model = tiny_causal_lm("llama", num_layers=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses: list[float] = []
    if monitor is not None:
        monitor.attach(model)
    for step in range(1, steps + 1):
        for _ in range(accumulate):
            ids = torch.randint(4, 100, (4, 24), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accumulate).backward()
            losses.append(float(loss.detach()))
        if monitor is not None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            rng = torch.get_rng_state()
            monitor.before_optimizer_step(step, model)
            assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
            assert torch.equal(torch.get_rng_state(), rng)
            assert all(m.training for m in model.modules())
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            metrics = monitor.step_end(step, model, loss=losses[-1])
            assert metrics is not None and metrics["inversion/n"] == 16
    if monitor is not None:
        monitor.close()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_engine_probes_before_the_step_and_training_is_unchanged(
    tmp_path: Path, accumulate: int
) -> None:
    import json

    path = tmp_path / "records.jsonl"
    config = MonitorConfig(every_n_steps=1, tokens_per_probe=16, jsonl_path=str(path))
    monitor = InversionMonitor(config)
    probed: list[tuple[torch.Tensor, ProbeResult | None]] = []
    original = monitor._measure

    def spy(step: int, plan: Any, **kwargs: Any) -> Any:
        out = original(step, plan, **kwargs)
        probed.append((plan.batch.input_ids, monitor.last_result))
        return out

    monitor._measure = spy  # type: ignore[method-assign]
    plain_losses, plain_weights = _custom_loop(None, accumulate=accumulate)
    losses, final = _custom_loop(monitor, accumulate=accumulate)
    assert losses == plain_losses
    for key, value in plain_weights.items():
        assert torch.equal(value, final[key]), key
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == losses[accumulate - 1 :: accumulate]
    assert {r["prefix"] for r in records} == {"captured"}
    assert monitor.probes == 4
    # the probed batch is the last micro-batch's (the captured forward's)
    assert len({id(ids) for ids, _ in probed}) == 4


def test_engine_without_the_pre_step_call_recomputes_and_says_why(tmp_path: Path) -> None:
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=16))
    model = tiny_causal_lm("llama", num_layers=2).train()
    monitor.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(4, 100, (4, 24), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert monitor.step_end(1, model) is not None
    result = monitor.last_result
    assert result is not None and result.prefix == "recomputed"
    assert result.prefix_reason == "probed after the optimizer step (no before_optimizer_step call)"
    monitor.close()
