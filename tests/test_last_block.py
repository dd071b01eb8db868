"""The last block's one-pass Q/K/V/O path equals the brute-force reference, or is not used."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers.modeling_utils import AttentionInterface

from inversion_monitor.probe import attention_replay, key_value_norms, last_block, split_forward
from inversion_monitor.probe.architectures import resolve_model
from inversion_monitor.probe.attention_capture import AttentionRecorded, recording_attention
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.key_value_norms import rows_independent, slot_ranks
from inversion_monitor.probe.last_block import last_block_position_refusal
from inversion_monitor.probe.op_counts import OpCounter
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.toy.models import tiny_causal_lm
from tests.test_probe import assert_matches_reference, batch
from tests.test_probe_counts import _captured

ALL = ("q", "k", "v", "o")


def _compare(model, *, left=False, seed=0, path="last_block", **kwargs):
    """Probe twice (the first probe of a module also checks the replayed backward against
    the model's own; the second skips that): both equal the reference."""
    ids, mask = batch(seed, left=left)
    kwargs = {"attention_mask": mask, **kwargs}
    reference = reference_norms(model, ids, **kwargs)
    last = resolve_model(model).num_layers - 1
    for _ in range(2):
        fast = logit_gradient_norms(model, ids, **kwargs)
        assert_matches_reference(fast, reference)
        assert {p for c, p in fast.paths.items() if c[0] == last} == {path}
    return fast


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_toy_architectures(arch, implementation, left):
    model = tiny_causal_lm(arch, num_layers=2, seed=1, attn_implementation=implementation)
    _compare(model, left=left)


def _config(cls, **extra):
    common = {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
    }
    return cls(**common, **extra)


CONFIGS = {
    # soft-capped attention scores and logits, sliding window shorter than the batch
    "gemma2-softcap-window": lambda: _config(
        transformers.Gemma2Config,
        head_dim=8,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
        sliding_window=4,
        query_pre_attn_scalar=16,
    ),
    "gemma3-qk-norm-window": lambda: _config(
        transformers.Gemma3TextConfig, head_dim=8, sliding_window=4, query_pre_attn_scalar=16
    ),
    "qwen3-qk-norm": lambda: _config(transformers.Qwen3Config, head_dim=8),
    "olmo2-full-width-qk-norm": lambda: _config(transformers.Olmo2Config),
    "mistral-window": lambda: _config(transformers.MistralConfig, sliding_window=4),
    "phi3-fused-qkv": lambda: _config(transformers.Phi3Config),
}


@pytest.mark.parametrize(
    ("name", "implementation"),
    # Gemma-2 has no sdpa implementation in transformers
    [
        (n, i)
        for n in sorted(CONFIGS)
        for i in ("sdpa", "eager")
        if (n, i) != ("gemma2-softcap-window", "sdpa")
    ],
)
def test_transformers_families(name, implementation):
    config = CONFIGS[name]()
    config._attn_implementation = implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _compare(model, left=name.startswith("qwen3"), seed=5)


@pytest.mark.parametrize("norm", ["frobenius", "l1"])
def test_other_norms(norm):
    _compare(tiny_causal_lm("llama", num_layers=2, seed=2), norm=norm)
    _compare(tiny_causal_lm("gpt2", num_layers=2, seed=2), norm=norm)


@pytest.mark.parametrize("projections", [("k",), ("v",), ("q", "v"), ("k", "o")])
def test_projection_subsets(projections):
    _compare(tiny_causal_lm("gpt_neox", num_layers=2, seed=3), projections=projections)


def test_duplicate_targets_are_not_double_counted():
    model = tiny_causal_lm("llama", num_layers=2, seed=4)
    positions = torch.tensor([[0, 3], [2, 5], [0, 3], [1, 2], [0, 3], [2, 5]])
    fast = _compare(model, positions=positions)
    assert torch.equal(fast.norms[(1, "k")][0], fast.norms[(1, "k")][2])
    single = logit_gradient_norms(
        model, batch(0)[0], attention_mask=batch(0)[1], positions=positions[:1]
    )
    torch.testing.assert_close(single.norms[(1, "v")][0], fast.norms[(1, "v")][4])


def test_deeper_layers_take_every_component_to_the_general_path():
    # the general path's rows reach layer 0 anyway: the last block comes with them for free
    model = tiny_causal_lm("qwen2", num_layers=3, seed=5)
    fast = _compare(model, layers=[0, -1], path="general")
    assert set(fast.paths.values()) == {"general"}


def test_rank_one_only_keeps_its_path():
    fast = _compare(tiny_causal_lm("llama", num_layers=2), projections=("q", "o"), path="rank_one")
    assert set(fast.paths.values()) == {"rank_one"}


def test_unknown_attention_function_falls_back_to_the_general_path():
    def my_attention(module, query, key, value, attention_mask, **kwargs):
        sdpa = AttentionInterface._global_mapping["sdpa"]
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("my_attention", my_attention)
    try:
        model = tiny_causal_lm("llama", num_layers=2, seed=6)
        model.config._attn_implementation = "my_attention"
        _compare(model, path="general")
    finally:
        AttentionInterface._global_mapping.pop("my_attention", None)


class _ScaledBackward(torch.autograd.Function):
    """Identity forward, doubled backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_a_replay_whose_backward_differs_from_the_models_is_refused():
    """The replay's dz/dq is checked against the model's own backward (on a module's first
    probe): an attention function whose backward differs for the replay's augmented head
    dimension is caught, and the general path gives the exact values."""
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def differing(module, query, key, value, attention_mask, **kwargs):
        output, weights = sdpa(module, query, key, value, attention_mask, **kwargs)
        if query.shape[-1] != module.head_dim:  # only in the replay
            output = _ScaledBackward.apply(output)
        return output, weights

    AttentionInterface._global_mapping["sdpa"] = differing
    try:
        _compare(tiny_causal_lm("llama", num_layers=2, seed=6), path="general")
    finally:
        AttentionInterface._global_mapping["sdpa"] = sdpa


def test_a_value_projection_reaching_the_logits_around_the_attention_is_refused():
    """K and V terms come from the attention's keys and values only: an output that also
    reaches the logits another way sends every component to the general path."""
    model = tiny_causal_lm("llama", num_layers=2, seed=8)
    attention = model.model.layers[-1].self_attn
    stored = {}
    hooks = [
        attention.v_proj.register_forward_hook(lambda m, a, out: stored.__setitem__("v", out)),
        attention.o_proj.register_forward_hook(
            lambda m, a, out: out + 0.5 * stored["v"].sum(-1, keepdim=True)
        ),
    ]
    try:
        _compare(model, path="general")
        _compare(model, path="last_block", projections=("q", "k", "o"))
    finally:
        for hook in hooks:
            hook.remove()


def test_hybrid_layer_types_decide_by_what_follows_the_block():
    model = tiny_causal_lm("llama", num_layers=2, seed=7)
    resolved = resolve_model(model)
    assert last_block_position_refusal(resolved, 1) is None
    assert "not the last" in str(last_block_position_refusal(resolved, 0))
    # a declared non-attention layer *before* the last block does not matter to it
    model.config.layer_types = ["linear_attention", "full_attention"]
    assert last_block_position_refusal(resolve_model(model), 1) is None
    _compare(model, layers=[-1], path="last_block")


def test_model_config_and_hooks_restored():
    model = tiny_causal_lm("gpt2", num_layers=2, seed=8)
    attention = model.transformer.h[-1].attn
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    _compare(model)
    assert attention.config is model.config
    assert model.config._attn_implementation == "sdpa"
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == before


def test_an_attention_block_followed_by_a_declared_hybrid_layer_takes_the_general_path():
    model = tiny_causal_lm("llama", num_layers=2, seed=9)
    model.config.layer_types = ["full_attention", "linear_attention"]  # declared, as hybrids do
    ids, mask = batch(0)
    for projections in (("q", "o"), ("q", "k", "v", "o")):
        kwargs = {"attention_mask": mask, "layers": [0], "projections": projections}
        fast = logit_gradient_norms(model, ids, **kwargs)
        assert_matches_reference(fast, reference_norms(model, ids, **kwargs))
        assert set(fast.paths.values()) == {"general"}


def _routes(caplog):
    return {
        r.getMessage().split(":")[0]: r.getMessage().split(": ")[1]
        for r in caplog.records
        if r.getMessage().startswith("last block ")
    }


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_grouped_query_heads_are_separated_without_rope(implementation, caplog):
    # multi-query GPT-BigCode: 4 query heads share one key/value head and no rotary
    # embedding, so K and V both take the rank <= H route, which needs each query
    # head's score gradients and probabilities apart (the replay's one-hot columns)
    config = transformers.GPTBigCodeConfig(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, multi_query=True
    )
    config._attn_implementation = implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.transformer.h[-1].attn.num_key_value_groups == 4
    with caplog.at_level(logging.DEBUG, logger="inversion_monitor"):
        _compare(model, seed=11)
    assert _routes(caplog) == {
        "last block k": "rank <= H factors",
        "last block v": "rank <= H factors",
    }


def test_targets_spread_over_many_rows_share_vector_jacobian_products(caplog):
    # rotary K takes the Gram route: targets of different rows share one product
    model = tiny_causal_lm("qwen2", num_layers=2, seed=12)
    ids, mask = batch(12, rows=6, length=10, left=True)
    positions = torch.tensor([[0, 8], [0, 1], [0, 4], [1, 5], [2, 8], [2, 5], [5, 0], [5, 7]])
    kwargs = {"attention_mask": mask, "positions": positions}
    with caplog.at_level(logging.DEBUG, logger="inversion_monitor"):
        fast = logit_gradient_norms(model, ids, **kwargs)
    assert_matches_reference(fast, reference_norms(model, ids, **kwargs))
    assert set(fast.paths.values()) == {"last_block"}
    assert _routes(caplog)["last block k"] == "shared-input Gram"
    assert slot_ranks(torch.tensor([2, 0, 2, 1, 0, 2])).tolist() == [0, 0, 1, 0, 1, 2]


def test_sequences_longer_than_the_projection_input_width():
    # T = 48 > hidden 32: the Gram norm's input factor is trapezoidal, targets bucketed
    # by their support on both sides of the width
    model = tiny_causal_lm("llama", hidden_size=32, num_heads=4, num_layers=2, seed=13)
    ids = torch.randint(4, 100, (2, 48), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    positions = torch.tensor([[0, 2], [0, 20], [0, 31], [0, 33], [0, 46], [1, 38], [1, 10]])
    kwargs = {"attention_mask": mask, "positions": positions}
    fast = logit_gradient_norms(model, ids, **kwargs)
    assert_matches_reference(fast, reference_norms(model, ids, **kwargs))
    assert set(fast.paths.values()) == {"last_block"}


def test_rows_independent_detects_a_map_that_mixes_rows():
    projection = torch.randn(3, 5, 8, requires_grad=True)
    apart = projection.view(3, 5, 2, 4).transpose(1, 2) * 2.0
    assert rows_independent(apart, projection)
    mixed = apart + apart.roll(1, dims=0) * 0.5
    assert not rows_independent(mixed, projection)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_the_matmul_nuclear_route_cuda_takes_equals_the_reference(arch, monkeypatch):
    """On CUDA the K/V nuclear norms come from the Newton-Schulz route (matmuls only, with
    its float64 check): forced here on the CPU, the probe still equals the brute force."""
    from inversion_monitor.metrics import gram_nuclear

    calls = []
    newton = gram_nuclear.newton_trace_sqrt

    def spy(gram, *args, **kwargs):
        calls.append(tuple(gram.shape))
        return newton(gram, *args, **kwargs)

    monkeypatch.setattr(gram_nuclear, "default_route", lambda device: "newton")
    monkeypatch.setattr(gram_nuclear, "newton_trace_sqrt", spy)
    _compare(tiny_causal_lm(arch, num_layers=2, seed=4), left=arch == "llama")
    assert calls  # the route ran


def test_a_values_only_recording_keeps_no_graph_and_stops_the_forward():
    """Once a module's replayed backward was checked, the forward over every position keeps
    no graph of its attention function (nothing it would save for a backward is held) and
    stops right after it (the output projection does not run over every position)."""
    model = tiny_causal_lm("llama", num_layers=1, seed=1)
    attention = model.model.layers[0].self_attn
    ids = torch.tensor([[5, 6, 7, 8]])
    ran = []
    handle = attention.o_proj.register_forward_hook(lambda *args: ran.append(1))
    key = ("sdpa", torch.float32, "cpu")
    try:
        for values_only, stop in (((), False), ((key,), True)):
            with recording_attention(attention, values_only=values_only, stop=stop) as recorder:
                try:
                    model(input_ids=ids)
                except AttentionRecorded:
                    assert stop
                (call,) = recorder.calls
            assert (call.output.grad_fn is None) == bool(values_only)
            assert all(leaf.requires_grad != bool(values_only) for leaf in call.leaves)
            assert not recorder.stop  # one-shot
    finally:
        handle.remove()
    assert ran == [1]  # only the forward that was not stopped ran the output projection
    call.release_query_and_output()
    assert call.query.numel() == call.output.numel() == call.leaves[0].numel() == 0


def _saved_bytes(model, ids, positions):
    """Bytes of every tensor autograd kept for a backward during one probe call."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fast = logit_gradient_norms(model, ids, positions=positions)
    assert set(fast.paths.values()) == {"last_block"}
    return total[0]


def test_the_first_calls_whole_sequence_check_keeps_no_graph():
    # the first call checks the targets' rows against the whole forward's logits; that
    # forward is values only (it kept 8.8x a later call's saved activations at T 512 when
    # it recorded a graph nothing backpropagated through)
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    ids = torch.randint(4, 100, (1, 512), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 510]])
    first, steady = (_saved_bytes(model, ids, positions) for _ in range(2))
    assert steady > 0
    assert first <= 2 * steady


def _probe_with_prefix(model, ids, positions):
    """Two captured-prefix probes (a block's first, then a later one): the later one's
    result, both probes' counted peak extra bytes and the prefix's bytes."""
    peaks = []
    with _captured(model, ids) as prefix:  # a prefix is used while its capture is installed
        for _ in range(2):
            with OpCounter() as counter:
                fast = logit_gradient_norms(model, ids, positions=positions, prefix=prefix)
            assert set(fast.paths.values()) == {"last_block"} and fast.prefix == "captured", fast
            peaks.append(counter.peak_bytes)
        size = prefix.hidden.numel() * prefix.hidden.element_size()
    return fast, peaks, size


def _first_and_steady_peaks(cut, monkeypatch):
    """Peak extra bytes (counted) of a block's first captured-prefix probe and of a later
    one, with the tail check's cut at ``cut`` positions (a wide MLP: [B, T, 512])."""
    monkeypatch.setattr(last_block, "TAIL_CHECK_POSITIONS", cut)
    model = tiny_causal_lm("llama", num_layers=2, seed=3, intermediate_size=512)
    ids = torch.randint(4, 100, (2, 512), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 500], [1, 40], [1, 400]])
    return _probe_with_prefix(model, ids, positions)[1]


def test_the_first_calls_check_covers_a_bounded_cut_of_positions(monkeypatch):
    # the whole-sequence check runs over the first TAIL_CHECK_POSITIONS positions only, so
    # its values-only MLP activations ([B, cut, intermediate]) do not grow with T: measured
    # 2.8x a later probe's peak over all 512 positions, 1.02x over 64 (1.25x while the
    # one-time check of the attention's backward held its every-position dz/dq and cotangent
    # through the replays; it keeps the targets' rows of dz/dq only)
    first, steady = _first_and_steady_peaks(64, monkeypatch)
    assert first <= 1.05 * steady, (first, steady)
    whole, _ = _first_and_steady_peaks(512, monkeypatch)
    assert whole >= 2 * steady, (whole, steady)


@pytest.mark.parametrize("earliest", [5, 300], ids=["in-cut", "past-cut"])
def test_the_cut_tail_check_still_refuses_a_block_that_mixes_positions(monkeypatch, earliest):
    # an MLP that adds a running mean over positions mixes them outside the attention: the
    # first probe's check on the cut finds it (with targets in the cut, or only the earliest
    # target past it) and the last block is refused for the general path
    monkeypatch.setattr(last_block, "TAIL_CHECK_POSITIONS", 64)
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    mlp = resolve_model(model).blocks[-1].mlp
    plain = mlp.forward

    def mixing(x):
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return plain(x) + 0.5 * x.cumsum(1) / counts

    mlp.forward = mixing
    ids = torch.randint(4, 100, (1, 400), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, earliest], [0, 390]])
    result = logit_gradient_norms(model, ids, positions=positions)
    last = resolve_model(model).num_layers - 1
    assert {p for (layer, _), p in result.paths.items() if layer == last} == {"general"}
    assert "mixes positions" in str(last_block._TAIL_REFUSED[resolve_model(model).blocks[-1]])


def test_route_decisions_are_checked_on_a_projections_first_probe_only():
    # K under RoPE fails the factored form's premise (the same map at every position), V
    # passes it, both keep batch rows apart: decided on the first probe, taken as decided on
    # later ones (fewer vector-Jacobian products, the same norms bit for bit)
    model = tiny_causal_lm("llama", num_layers=2, seed=4)
    ids, mask = batch(0)
    attention = resolve_model(model).blocks[-1].self_attn
    first = logit_gradient_norms(model, ids, attention_mask=mask)
    decisions = last_block._ROUTE_DECISIONS
    k, v = (decisions[attention.k_proj], decisions[attention.v_proj])
    assert k[("k", "torch.float32", "cpu")] == {"factored": False, "rows apart": True}
    assert v[("v", "torch.float32", "cpu")] == {"factored": True, "rows apart": True}
    with OpCounter() as decided:
        second = logit_gradient_norms(model, ids, attention_mask=mask)
    decisions.pop(attention.k_proj)
    decisions.pop(attention.v_proj)
    with OpCounter() as checked:
        third = logit_gradient_norms(model, ids, attention_mask=mask)
    assert decided.ops < checked.ops, (decided.ops, checked.ops)
    for component, values in third.norms.items():  # a block's first probe also checks more
        assert torch.equal(second.norms[component], values), component
        torch.testing.assert_close(first.norms[component], values, rtol=1e-6, atol=0.0)


def test_rows_apart_is_not_learnt_from_one_row():
    # with one row the rows check holds trivially: a later batch of several rows checks it
    model = tiny_causal_lm("llama", num_layers=2, seed=4)
    ids, mask = batch(0)
    attention = resolve_model(model).blocks[-1].self_attn
    logit_gradient_norms(model, ids[:1], attention_mask=mask[:1])
    key = ("k", str(torch.float32), "cpu")
    assert "rows apart" not in last_block._ROUTE_DECISIONS[attention.k_proj][key]
    logit_gradient_norms(model, ids, attention_mask=mask)
    assert last_block._ROUTE_DECISIONS[attention.k_proj][key]["rows apart"] is True


@pytest.mark.parametrize("qr", [True, False], ids=["qr", "inputs"])
def test_the_gram_route_with_or_without_the_inputs_qr_equals_the_reference(monkeypatch, qr):
    # qr_pays chooses between R of X_b^T and X_b^T itself by their cost: both are exact
    from inversion_monitor.probe import key_value_norms

    monkeypatch.setattr(key_value_norms, "qr_pays", lambda *args: qr)
    factors = []
    original = key_value_norms.batched_input_factor

    def recorded(*args, **kwargs):
        factors.append(original(*args, **kwargs))
        return factors[-1]

    monkeypatch.setattr(key_value_norms, "batched_input_factor", recorded)
    _compare(tiny_causal_lm("llama", num_layers=2, seed=5))
    assert factors and all(bool(f.numel()) is qr for f in factors)


def _spy_on_replays(monkeypatch, record):
    """``record(call, target_rows, g, kwargs)`` on each call of the replays
    (``last_block.head_terms``), which then run as they would."""
    replay = last_block.head_terms

    def head_terms(call, target_rows, g, **kwargs):
        record(call, target_rows, g, kwargs)
        return replay(call, target_rows, g, **kwargs)

    monkeypatch.setattr(last_block, "head_terms", head_terms)


def test_the_replays_run_after_the_whole_forwards_query_and_output_are_released(monkeypatch):
    # the replays take the query and attention output at the targets only; those of every
    # position (each the size of the prefix, and in a first probe the attention's graph) go
    # before the replays' per-target copies, which were the peak at the goal shape
    seen = []

    def record(call, target_rows, g, kwargs):
        seen.append((call.query.numel(), call.output.numel(), call.leaves[0].numel()))
        assert target_rows.query.shape[0] == g.shape[0]

    _spy_on_replays(monkeypatch, record)
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    _compare(model)  # the first probe (checks the replayed backward) and a later one
    assert seen == [(0, 0, 0), (0, 0, 0)]


def test_streamed_gram_matrices_hold_one_group_at_a_time(monkeypatch):
    # every (slot, row)'s matrices from a [slots, B, r, a] view: the same Gram matrices as
    # one float64 copy of the flattened product, made a group of slots at a time
    monkeypatch.setattr(key_value_norms, "_MAX_SOLVE_BYTES", 4 * 24 * 8 * 8)
    product = torch.randn(4, 3, 24, 8).permute(1, 0, 2, 3)  # [3, 4, 24, 8], not flattenable
    whole = torch.einsum("nra,nrb->nab", *[product.reshape(12, 24, 8).double()] * 2)
    assert torch.allclose(key_value_norms._small_gram(product), whole)
    got = []

    class Sink:
        def add(self, grams):
            got.append(grams)

    with OpCounter() as counter:
        assert key_value_norms._small_gram(product, Sink()).numel() == 0
    assert [g.shape[0] for g in got] == [4, 4, 4]  # one slot (B matrices) per group
    assert torch.allclose(torch.cat(got), whole)
    group = 4 * 24 * 8 * 8  # one group's float64 copy
    assert counter.peak_bytes <= 2 * group, counter.peak_bytes


def test_input_product_in_blocks_accumulates_in_place(monkeypatch):
    # X_b^T Gamma in blocks of positions: the product of one pass, holding the total and one
    # block's fp32 inputs (a product-sized part beside the total was the goal shape's peak)
    monkeypatch.setattr(key_value_norms, "_MAX_INPUT_BLOCK_ELEMENTS", 2 * 64 * 16)  # 16 rows
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 100, 64, generator=gen).bfloat16()
    gamma = torch.randn(2, 100, 48, generator=gen)
    with OpCounter() as counter:
        got = key_value_norms.input_product(x, gamma)
    torch.testing.assert_close(got, x.float().transpose(1, 2) @ gamma, rtol=1e-5, atol=1e-4)
    total, block = 2 * 64 * 48 * 4, 2 * 16 * 64 * 4
    assert counter.peak_bytes <= total + 2 * block, (counter.peak_bytes, total, block)


def test_the_embedding_is_stood_in_where_the_block_takes_nothing_from_it(monkeypatch):
    # fed from a prefix, the embedding's output ([B, T, d]) was held through the forward over
    # every position for nothing; a zero stand-in holding no memory takes its place once the
    # block's keyword arguments were seen to come out the same (the same norms, to the bit).
    # With the replay and cotangent chunks at their least (as at long T, where the forward
    # over every position is the peak: 6.3x the prefix at the goal shape with the embedding)
    monkeypatch.setattr(attention_replay, "_MAX_REPLAY_ELEMENTS", 1)
    monkeypatch.setattr(key_value_norms, "_MAX_COTANGENT_ELEMENTS", 1)
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    ids = torch.randint(4, 100, (2, 1024), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 1000], [1, 40], [1, 600]])
    stood, (_, peak), size = _probe_with_prefix(model, ids, positions)
    (key,) = split_forward._STAND_IN_HOLDS[model]
    assert split_forward._STAND_IN_HOLDS[model] == {key: True}
    split_forward._STAND_IN_HOLDS[model] = {key: False}
    real, (_, real_peak), _ = _probe_with_prefix(model, ids, positions)
    for component, value in real.norms.items():
        assert torch.equal(stood.norms[component], value), component
    assert torch.equal(stood.entropy, real.entropy)
    assert real_peak - peak >= 0.9 * size, (real_peak, peak, size)


def test_a_model_whose_blocks_take_values_from_the_embedding_keeps_it():
    # a model that computes what its blocks receive from the embedding's output (here the
    # rotary tables, as Gemma-3n's per-layer inputs) must see the real one: the check finds
    # the difference and the norms still equal the reference
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    rotary = model.model.rotary_emb
    plain = rotary.forward

    def from_values(x, position_ids):
        cos, sin = plain(x, position_ids)
        scale = 1 + x.float().abs().mean(-1, keepdim=True).to(cos.dtype) * 1e-2
        return cos * scale, sin * scale

    rotary.forward = from_values
    ids = torch.randint(4, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 60], [1, 40]])
    fast, _, _ = _probe_with_prefix(model, ids, positions)
    assert list(split_forward._STAND_IN_HOLDS[model].values()) == [False]
    reference = reference_norms(model, ids, positions=positions)
    assert_matches_reference(fast, reference)


def test_a_blocks_first_checks_run_on_a_probe_of_the_first_positions(monkeypatch):
    # the attention's own backward over every position (checked once: its every-position
    # cotangent and dz/dq) runs on a probe of the targets within the first
    # TAIL_CHECK_POSITIONS positions; the probe over every position is then values only
    monkeypatch.setattr(last_block, "TAIL_CHECK_POSITIONS", 64)
    seen = []
    _spy_on_replays(
        monkeypatch,
        lambda call, target_rows, g, kwargs: seen.append(
            (kwargs["dq"] is not None, call.key.shape[2], g.shape[0])
        ),
    )
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    ids = torch.randint(4, 100, (2, 400), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 390], [1, 40], [1, 200]])
    reference = reference_norms(model, ids, positions=positions)
    for _ in range(2):
        assert_matches_reference(logit_gradient_norms(model, ids, positions=positions), reference)
    # the cut's two targets (t 5 and 40: 41 positions) with the check, then every target twice
    assert seen == [(True, 41, 2), (False, 391, 4), (False, 391, 4)]


def test_a_model_that_writes_to_the_embedding_in_place_keeps_it():
    # the stand-in is one element seen through stride-0 dimensions: a model writing to the
    # embedding's output in place fails on it, which the check counts as a difference
    model = tiny_causal_lm("llama", num_layers=2, seed=3)
    model.model.rotary_emb.register_forward_pre_hook(lambda module, args: args[0].mul_(1.0))
    ids = torch.randint(4, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 5], [0, 60], [1, 40]])
    fast, _, _ = _probe_with_prefix(model, ids, positions)
    assert list(split_forward._STAND_IN_HOLDS[model].values()) == [False]
    assert_matches_reference(fast, reference_norms(model, ids, positions=positions))
