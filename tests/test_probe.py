"""The probe equals the brute-force reference, and leaves the model as it found it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from inversion_monitor.probe.architectures import (
    ArchitectureAdapter,
    llama_style_projections,
    rank_one_exact,
    register_adapter,
    resolve_model,
    unregister_adapter,
)
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.probe.sampling import valid_positions
from inversion_monitor.toy.models import tiny_causal_lm

RTOL = 1e-4


def batch(seed: int = 0, *, rows: int = 3, length: int = 11, left: bool = False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    # ragged: the second row is 4 tokens short, the third 2 (padding id 0)
    for row, short in ((1, 4), (2, 2)):
        if row < rows:
            if left:
                mask[row, :short] = 0
                ids[row, :short] = 0
            else:
                mask[row, length - short :] = 0
                ids[row, length - short :] = 0
    return ids, mask


def assert_matches_reference(fast, ref):
    assert torch.equal(fast.positions, ref.positions)
    assert torch.equal(fast.tokens, ref.tokens)
    assert sorted(fast.norms) == sorted(ref.norms)
    for component, expected in ref.norms.items():
        torch.testing.assert_close(
            fast.norms[component],
            expected.float(),
            rtol=RTOL,
            atol=1e-6,
            msg=lambda m, c=component: f"{c}: {m}",
        )
    torch.testing.assert_close(fast.score, ref.score.float(), rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(fast.entropy, ref.entropy.float(), rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, -1], ids=["first", "middle", "last"])
def test_every_projection_equals_brute_force(tiny_model, layer):
    ids, mask = batch()
    fast = logit_gradient_norms(tiny_model, ids, attention_mask=mask, layers=[layer])
    ref = reference_norms(tiny_model, ids, attention_mask=mask, layers=[layer])
    assert len(fast) == int(valid_positions(ids, mask).sum())
    assert_matches_reference(fast, ref)


def test_rank_one_fast_path_equals_brute_force(tiny_model):
    ids, mask = batch(1)
    fast = logit_gradient_norms(tiny_model, ids, attention_mask=mask, projections=("q", "o"))
    ref = reference_norms(tiny_model, ids, attention_mask=mask, projections=("q", "o"))
    assert_matches_reference(fast, ref)


@pytest.mark.parametrize("norm", ["frobenius", "l1"])
@pytest.mark.parametrize("projections", [("q", "o"), ("q", "k", "v", "o")])
def test_other_norms_equal_brute_force(arch, norm, projections):
    model = tiny_causal_lm(arch, num_layers=2, seed=3)
    ids, mask = batch(2)
    kwargs = {"attention_mask": mask, "layers": [0, -1], "projections": projections, "norm": norm}
    if projections == ("q", "o"):
        kwargs["layers"] = [-1]
    assert_matches_reference(
        logit_gradient_norms(model, ids, **kwargs), reference_norms(model, ids, **kwargs)
    )


def test_left_padding_and_explicit_unsorted_positions(make_model):
    model = make_model("qwen2", num_layers=2, seed=4)
    ids, mask = batch(3, left=True)
    positions = torch.tensor([[2, 9], [0, 0], [1, 5], [0, 7], [2, 3]])
    kwargs = {"attention_mask": mask, "positions": positions, "layers": [0, 1]}
    fast = logit_gradient_norms(model, ids, **kwargs)
    assert torch.equal(fast.positions, positions)
    assert_matches_reference(fast, reference_norms(model, ids, **kwargs))


@pytest.mark.parametrize("chunk_tokens", [1, 10, 25])
@pytest.mark.parametrize(
    "kwargs", [{"layers": [0, 1]}, {"projections": ("q", "o")}], ids=["general", "rank-one"]
)
def test_chunking_does_not_change_values(make_model, chunk_tokens, kwargs):
    model = make_model("gpt2", num_layers=2, seed=5)
    ids, mask = batch(4)
    whole = logit_gradient_norms(model, ids, attention_mask=mask, **kwargs)
    chunked = logit_gradient_norms(
        model, ids, attention_mask=mask, chunk_tokens=chunk_tokens, **kwargs
    )
    for component, values in whole.norms.items():
        torch.testing.assert_close(chunked.norms[component], values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked.entropy, whole.entropy)


def test_softcapped_logits_gemma2():
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=None,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = batch(5)
    kwargs = {"attention_mask": mask, "layers": [0, -1]}
    assert_matches_reference(
        logit_gradient_norms(model, ids, **kwargs), reference_norms(model, ids, **kwargs)
    )


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_model_left_exactly_as_found(make_model):
    model = make_model("llama", num_layers=2, seed=6)
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back as they were
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    hooks = _hooks(model)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    ids, mask = batch(6)
    result = logit_gradient_norms(model, ids, attention_mask=mask, layers=[0, 1])
    assert torch.equal(torch.random.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert _hooks(model) == hooks
    tensors = [result.entropy, result.score, *result.norms.values()]
    assert not any(t.requires_grad or t.grad_fn is not None for t in tensors)


def test_dropout_is_off_during_the_probe(make_model):
    model = make_model("gpt2", num_layers=2, seed=7)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()
    ids, mask = batch(7)
    first = logit_gradient_norms(model, ids, attention_mask=mask, layers=[0])
    second = logit_gradient_norms(model, ids, attention_mask=mask, layers=[0])
    torch.testing.assert_close(first.score, second.score)
    assert model.training


def test_frozen_model_and_no_grad_and_inference_mode_callers(make_model):
    model = make_model("gpt_neox", num_layers=2, seed=8)
    ids, mask = batch(8)
    expected = reference_norms(model, ids, attention_mask=mask, layers=[0, 1])
    model.requires_grad_(False)
    assert_matches_reference(
        logit_gradient_norms(model, ids, attention_mask=mask, layers=[0, 1]), expected
    )
    with torch.no_grad():
        assert_matches_reference(
            logit_gradient_norms(model, ids, attention_mask=mask, layers=[0, 1]), expected
        )
    with torch.inference_mode():
        inside = logit_gradient_norms(model, ids.clone(), attention_mask=mask, layers=[0, 1])
    assert_matches_reference(inside, expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_bf16_model_accumulates_in_fp32(make_model):
    model = make_model("llama", num_layers=2, seed=9)
    ids, mask = batch(9)
    layer_sets = ([0, 1], [-1])  # the general path, and the last block's one-pass path
    exact = [logit_gradient_norms(model, ids, attention_mask=mask, layers=ls) for ls in layer_sets]
    model.to(torch.bfloat16)
    for layers, want in zip(layer_sets, exact, strict=True):
        low = logit_gradient_norms(model, ids, attention_mask=mask, layers=layers)
        assert low.score.dtype == torch.float32 and torch.isfinite(low.score).all()
        torch.testing.assert_close(low.score, want.score, rtol=0.1, atol=1e-3)
        assert torch.corrcoef(torch.stack([low.score, want.score]))[0, 1] > 0.99
    assert set(low.paths.values()) == {"last_block"}


def test_lora_model_measures_the_base_weight_gradient(make_model):
    import peft

    base = make_model("llama", num_layers=2, seed=10)
    lora = peft.get_peft_model(
        make_model("llama", num_layers=2, seed=10),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    ids, mask = batch(10)
    kwargs = {"attention_mask": mask, "layers": [0, 1]}
    got = logit_gradient_norms(lora, ids, **kwargs)
    # y = W x + B A x = (W + BA) x, so dz/dW equals the merged model's weight gradient
    merged_model = peft.get_peft_model(
        make_model("llama", num_layers=2, seed=10),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    merged_model.load_state_dict(lora.state_dict())
    merged_model = merged_model.merge_and_unload(progressbar=False)
    assert_matches_reference(got, reference_norms(merged_model, ids, **kwargs))
    # and the LoRA update really changed the function: not the base model's values
    plain = logit_gradient_norms(base, ids, **kwargs)
    assert not torch.allclose(plain.norms[(0, "q")], got.norms[(0, "q")])


def test_ddp_wrapped_model(make_model, tmp_path):
    import torch.distributed as dist

    model = make_model("gpt2", num_layers=2, seed=11)
    ids, mask = batch(11)
    expected = logit_gradient_norms(model, ids, attention_mask=mask, layers=[0, 1])
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        got = logit_gradient_norms(wrapped, ids, attention_mask=mask, layers=[0, 1])
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got.score, expected.score)


def test_unknown_model_type_is_refused_then_registered_adapter():
    import transformers

    config = transformers.OPTConfig(
        vocab_size=100,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids, mask = batch(12)
    # never treated as Llama, although its attention looks like it
    with pytest.raises(NotImplementedError, match=r"model_type opt .*register_adapter"):
        logit_gradient_norms(model, ids, attention_mask=mask)
    adapter = ArchitectureAdapter(
        "opt",
        layers=lambda decoder: list(decoder.layers),
        projections=lambda block, config: llama_style_projections(block.self_attn),
    )
    register_adapter("opt", adapter)
    try:
        kwargs = {"attention_mask": mask, "layers": [0, 1], "projections": ("q", "o")}
        resolved = resolve_model(model)
        assert not rank_one_exact(resolved, 1)  # a user adapter does not vouch: general path
        assert_matches_reference(
            logit_gradient_norms(model, ids, **kwargs), reference_norms(model, ids, **kwargs)
        )
    finally:
        unregister_adapter("opt")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layers": [3]}, ValueError, r"layer 3 is out of range .* 0\.\.1"),
        ({"layers": [-3]}, ValueError, "layer -3 is out of range"),
        ({"projections": ("q", "x")}, ValueError, "projections must be a non-empty subset"),
        ({"projections": ()}, ValueError, "projections must be a non-empty subset"),
        ({"projections": ("q", "q")}, ValueError, "duplicates"),
        ({"norm": "spectral"}, ValueError, "norm must be one of"),
        ({"chunk_tokens": 0}, ValueError, "chunk_tokens must be a positive int"),
        ({"positions": torch.tensor([[0, 10]])}, ValueError, r"t \+ 1 < seq_len"),
        ({"positions": torch.tensor([[1, 6]])}, ValueError, r"\[\[1, 6\]\] cannot be targets"),
        ({"positions": torch.tensor([[5, 0]])}, ValueError, "cannot be targets"),
        ({"positions": torch.tensor([[0.0, 1.0]])}, TypeError, "LongTensor"),
        ({"positions": torch.tensor([0, 1])}, ValueError, r"\[N, 2\]"),
        ({"attention_mask": torch.ones(3, 4)}, ValueError, "attention_mask must have the shape"),
    ],
)
def test_bad_arguments_get_clear_errors(make_model, kwargs, error, message):
    model = make_model("llama", num_layers=2)
    ids, mask = batch()
    kwargs = {"attention_mask": mask, **kwargs}
    with pytest.raises(error, match=message):
        logit_gradient_norms(model, ids, **kwargs)


def test_input_ids_validation(make_model):
    model = make_model("llama", num_layers=1)
    with pytest.raises(TypeError, match="LongTensor"):
        logit_gradient_norms(model, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="seq_len >= 2"):
        logit_gradient_norms(model, torch.zeros(2, 1, dtype=torch.long))


def test_fsdp1_is_refused_naming_the_switch_to_fsdp2(make_model, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = FullyShardedDataParallel(
            make_model("llama", num_layers=1), device_id=torch.device("cpu")
        )
        with pytest.raises(NotImplementedError, match=r"FSDP1 .*switch to FSDP2 .*fully_shard"):
            logit_gradient_norms(wrapped, batch()[0])
    finally:
        dist.destroy_process_group()


def test_no_valid_targets_gives_empty_result(make_model):
    model = make_model("llama", num_layers=1)
    ids = torch.tensor([[5, 6, 0, 0]])
    result = logit_gradient_norms(model, ids, attention_mask=torch.tensor([[1, 0, 0, 0]]))
    assert len(result) == 0 and result.score.shape == (0,)


@pytest.mark.parametrize(
    "kwargs",
    [{"projections": ("q", "o")}, {"layers": [0, -1]}],
    ids=["rank-one", "general"],
)
def test_duplicate_targets_are_measured_once(make_model, kwargs):
    model = make_model("llama", num_layers=2, seed=5)
    ids, mask = batch(5)
    positions = torch.tensor([[0, 3], [2, 1], [0, 3], [0, 3], [1, 5], [2, 1]])
    got = logit_gradient_norms(model, ids, attention_mask=mask, positions=positions, **kwargs)
    assert torch.equal(got.positions, positions)
    assert_matches_reference(
        got, reference_norms(model, ids, attention_mask=mask, positions=positions, **kwargs)
    )


def packed_row() -> tuple[torch.Tensor, torch.Tensor]:
    """Three documents in one row and one plain row; position_ids restart per document."""
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(4, 100, (2, 12), generator=gen)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(12))])
    return ids, pos


@pytest.mark.parametrize("with_mask", [True, False], ids=["all-ones-mask", "no-mask"])
@pytest.mark.parametrize(
    "kwargs",
    [{"projections": ("q", "o")}, {"layers": [0, -1]}],
    ids=["rank-one", "general"],
)
def test_packed_documents_never_attend_to_each_other(make_model, with_mask, kwargs):
    model = make_model("llama", num_layers=2, seed=6)
    ids, pos = packed_row()
    mask = torch.ones_like(ids) if with_mask else None
    got = logit_gradient_norms(model, ids, attention_mask=mask, position_ids=pos, **kwargs)
    # no target predicts across a document boundary (t = 3 and t = 6 of row 0)
    assert sorted(set(range(11)) - set(got.positions[got.positions[:, 0] == 0, 1].tolist())) == [
        3,
        6,
    ]
    ref = reference_norms(model, ids, attention_mask=mask, position_ids=pos, **kwargs)
    assert_matches_reference(got, ref)
    # and the documents really would interact: without position_ids they do
    crossed = logit_gradient_norms(
        model, ids, attention_mask=mask, positions=got.positions, **kwargs
    )
    assert not torch.allclose(crossed.score, got.score, rtol=1e-3)


def test_position_ids_are_passed_to_the_model(make_model):
    model = make_model("gpt2", num_layers=2, seed=7)  # absolute positions (RoPE ignores shifts)
    ids, mask = batch(7)
    pos = (torch.arange(ids.shape[1]) + 5)[None]  # a [1, T] offset, shared by every row
    kwargs = {"attention_mask": mask, "position_ids": pos, "layers": [0, -1]}
    got = logit_gradient_norms(model, ids, **kwargs)
    assert_matches_reference(got, reference_norms(model, ids, **kwargs))
    default = logit_gradient_norms(model, ids, attention_mask=mask, layers=[0, -1])
    assert not torch.allclose(got.score, default.score, rtol=1e-3)


def test_packed_target_across_a_boundary_is_refused(make_model):
    model = make_model("llama", num_layers=1)
    ids, pos = packed_row()
    with pytest.raises(ValueError, match=r"\[\[0, 3\]\] cannot be targets.*same\s+packed document"):
        logit_gradient_norms(model, ids, position_ids=pos, positions=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match=r"position_ids must be \[batch, seq_len\]"):
        logit_gradient_norms(model, ids, position_ids=pos[:, :5])
