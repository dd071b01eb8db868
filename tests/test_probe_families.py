"""Every built-in family, hybrid and wrapper equals the brute-force reference, or is refused.

Tiny random models are built from transformers' own config classes. The
reference takes its logits from the model's real forward, so the model's own
logit post-processing (Granite and HyperCLOVA X scaling, Falcon-H1's head
multiplier, Gemma soft-caps, multimodal wrappers) is what both sides measure.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from inversion_monitor.probe.architectures import (
    _LLAMA_STYLE_GENERAL_TYPES,
    _LLAMA_STYLE_TYPES,
    positions_mix_after,
    rank_one_exact,
    resolve_model,
)
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.reference import reference_norms

TEXT: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# text configs that only live inside a multimodal wrapper (tested through it)
_WRAPPED_ONLY = {"qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text"}
# need more than the common arguments (tested below)
_SPECIAL = {"qwen3_next", "gemma3n_text", "falcon_h1"}


def build(config: Any, cls: Any = transformers.AutoModelForCausalLM) -> Any:
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else None
        if model is None:
            model = cls._from_config(config)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return ids, mask


def assert_exact(model: Any, **kwargs: Any) -> None:
    ids, mask = batch()
    got = logit_gradient_norms(model, ids, attention_mask=mask, **kwargs)
    ref = reference_norms(model, ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.positions, ref.positions)
    for component, expected in ref.norms.items():
        torch.testing.assert_close(
            got.norms[component],
            expected,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, c=component: f"{c}: {m}",
        )
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "model_type",
    sorted(set(_LLAMA_STYLE_TYPES + _LLAMA_STYLE_GENERAL_TYPES) - _WRAPPED_ONLY - _SPECIAL),
)
def test_llama_style_family_equals_reference(model_type):
    model = build(transformers.AutoConfig.for_model(model_type, **TEXT))
    assert_exact(model, layers=[0, -1])
    assert_exact(model, projections=("q", "o"))  # the rank-one path where vouched


@pytest.mark.parametrize(
    "layout",
    [{"new_decoder_architecture": True, "num_kv_heads": 2}, {"multi_query": True}, {}],
    ids=["new", "old-multi-query", "old"],
)
def test_falcon_layouts(layout):
    common = {k: v for k, v in TEXT.items() if k not in ("intermediate_size", "head_dim")}
    config = transformers.FalconConfig(
        **{**common, "multi_query": False, **layout, "num_key_value_heads": 2}
    )
    assert_exact(build(config), layers=[0, -1])


@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode(multi_query):
    config = transformers.GPTBigCodeConfig(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, multi_query=multi_query
    )
    assert_exact(build(config), layers=[0, -1])


def test_bloom():
    config = transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4)
    assert_exact(build(config), layers=[0, -1])


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("granite", {"logits_scaling": 4.0}),
        ("hyperclovax", {"logits_scaling": 4.0}),  # multiplies, where Granite divides
        ("gemma2", {"final_logit_softcapping": 2.0}),
        (
            "falcon_h1",
            {
                "lm_head_multiplier": 3.0,
                "mamba_d_ssm": 16,
                "mamba_n_heads": 4,
                "mamba_d_head": 4,
                "mamba_d_state": 8,
                "mamba_n_groups": 1,
                "mamba_chunk_size": 4,
            },
        ),
    ],
)
def test_the_models_own_logit_post_processing(model_type, extra):
    model = build(transformers.AutoConfig.for_model(model_type, **TEXT, **extra))
    with torch.no_grad():  # logits large enough for scaling and soft-caps to matter
        model.get_output_embeddings().weight.mul_(30.0)
    assert_exact(model, layers=[0, -1])
    # the post-processing matters: the head's raw logits would give other entropies
    ids, mask = batch()
    got = logit_gradient_norms(model, ids, attention_mask=mask, projections=("q",))
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    raw = model.get_output_embeddings()(hidden)[got.positions[:, 0], got.positions[:, 1]]
    raw_entropy = -(raw.log_softmax(-1).exp() * raw.log_softmax(-1)).sum(-1)
    assert not torch.allclose(got.entropy, raw_entropy.detach(), rtol=0.05)


def test_falcon_h1_hybrid_blocks_use_the_general_path():
    model = build(
        transformers.AutoConfig.for_model(
            "falcon_h1",
            **TEXT,
            mamba_d_ssm=16,
            mamba_n_heads=4,
            mamba_d_head=4,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=4,
        )
    )
    assert "does not vouch" in str(positions_mix_after(resolve_model(model), -1))
    assert_exact(model, projections=("q", "o"))


def test_gemma3_multimodal_wrapper_text_only():
    config = transformers.Gemma3Config(
        text_config={**TEXT, "final_logit_softcapping": 2.0},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
    )
    model = build(config, transformers.Gemma3ForConditionalGeneration)
    resolved = resolve_model(model)
    assert (resolved.model_type, resolved.config.model_type) == ("gemma3", "gemma3_text")
    assert resolved.blocks[0] is model.model.language_model.layers[0]
    assert_exact(model, layers=[0, -1])
    assert_exact(model, projections=("q", "o"))


def test_qwen2_vl_wrapper_text_only():
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    config = transformers.Qwen2VLConfig(
        text_config={**text, "rope_parameters": rope},
        vision_config={"embed_dim": 16, "depth": 1, "num_heads": 2, "hidden_size": 32},
    )
    model = build(config, transformers.Qwen2VLForConditionalGeneration)
    assert_exact(model, layers=[0, -1])


def _qwen3_next(layer_types: list[str]) -> Any:
    return build(
        transformers.AutoConfig.for_model(
            "qwen3_next",
            **TEXT,
            layer_types=layer_types,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=0,
        )
    )


def test_hybrid_attention_followed_by_linear_attention_is_not_rank_one():
    model = _qwen3_next(["full_attention", "linear_attention"])
    resolved = resolve_model(model)
    assert positions_mix_after(resolved, 0) == "block 1 comes after block 0 and mixes positions"
    # Q/O of the last attention block: the general path, equal to brute force
    assert_exact(model, layers=[0], projections=("q", "o"))
    with pytest.raises(
        NotImplementedError,
        match=r"layer 1 .* 'linear_attention' layer .* attention layers are \[0\]",
    ):
        logit_gradient_norms(model, batch()[0], layers=[-1])


def test_hybrid_ending_in_attention_keeps_the_rank_one_path():
    model = _qwen3_next(["linear_attention", "full_attention"])
    assert rank_one_exact(resolve_model(model), 1)
    assert_exact(model, layers=[1], projections=("q", "o"))
    assert_exact(model, layers=[1])


def test_kv_sharing_layers_refuse_k_and_v_only():
    config = transformers.AutoConfig.for_model(
        "gemma3n_text",
        **{**TEXT, "num_hidden_layers": 4},
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=96,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        activation_sparsity_pattern=[0.0] * 4,
        altup_num_inputs=2,
        sliding_window=4,
    )
    model = build(config)
    assert_exact(model, layers=[0, 1, 2, 3], projections=("q", "o"))
    assert_exact(model, layers=[1], projections=("k", "v"))  # feeds layers 1 and 3
    with pytest.raises(
        NotImplementedError,
        match=r"layer 2 \(Gemma3nTextAttention\) shares keys and values .* k at layers \[0, 1\]",
    ):
        logit_gradient_norms(model, batch()[0], layers=[2], projections=("k",))


def _fused_models() -> dict[str, Any]:
    common = {k: v for k, v in TEXT.items() if k not in ("intermediate_size", "head_dim")}
    return {
        "falcon-new": transformers.FalconConfig(
            **common, new_decoder_architecture=True, num_kv_heads=2
        ),
        "falcon-multi-query": transformers.FalconConfig(**common, multi_query=True),
        "falcon-old": transformers.FalconConfig(**common, multi_query=False),
        "gpt_bigcode-multi-query": transformers.GPTBigCodeConfig(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, multi_query=True
        ),
        "gpt_bigcode": transformers.GPTBigCodeConfig(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, multi_query=False
        ),
        "bloom": transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4),
        "gpt_neox": transformers.GPTNeoXConfig(**common),
        "gpt2": transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4),
        "phi3": transformers.Phi3Config(**{**TEXT, "pad_token_id": None}),
    }


@pytest.mark.parametrize("name", list(_fused_models()))
def test_fused_column_split_matches_the_gradient_structure(name):
    """An independent check of the adapters' Q/K/V column maps (the reference uses them too).

    In the last block the query gradient of one logit is rank one (g_t x_t^T), the
    key gradient sums over several heads or positions (rank > 1); at the first
    position attention has a single key, so only V has a gradient there.
    Swapping any two blocks breaks one of these.
    """
    model = build(_fused_models()[name])
    resolved = resolve_model(model)
    sites = resolved.projections(-1)
    fused = sites["q"].module
    weight = fused.weight
    columns = {p: sites[p].columns for p in ("q", "k", "v")}
    rows = torch.cat(list(columns.values()))
    conv1d = type(fused).__name__ == "Conv1D"
    assert sorted(rows.tolist()) == list(range(weight.shape[1 if conv1d else 0]))
    ids = torch.randint(4, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids).logits
    (grad,) = torch.autograd.grad(logits[0, 7, ids[0, 8]], weight, retain_graph=True)
    grad = grad.T if conv1d else grad
    singular = {p: torch.linalg.svdvals(grad[c].double()) for p, c in columns.items()}
    ratio = {p: (s / s[0]).tolist() for p, s in singular.items()}
    heads = int(resolved.config.num_attention_heads)
    assert ratio["q"][1] < 1e-6, f"Q block is not rank one: {ratio['q'][:3]}"
    assert ratio["k"][1] > 1e-4, f"K block looks rank one: {ratio['k'][:3]}"
    assert len(ratio["v"]) <= heads or ratio["v"][heads] < 1e-6
    (first,) = torch.autograd.grad(logits[0, 0, ids[0, 1]], weight)
    first = first.T if conv1d else first
    assert float(first[columns["v"]].abs().max()) > 1e-6
    assert float(first[columns["q"]].abs().max()) == 0.0
    assert float(first[columns["k"]].abs().max()) == 0.0
