"""Where the attention projections of each architecture live, and which layers can be probed.

The probe needs, for every decoder block, the module computing each of the
Q, K, V and O projections and, for fused modules, which output features
belong to which projection. An :class:`ArchitectureAdapter` answers that for
one family; :func:`resolve_model` unwraps DDP / DeepSpeed / ``torch.compile`` /
PEFT, finds the text decoder (also inside multimodal ``*ForConditionalGeneration``
wrappers) and picks the adapter from ``config.model_type`` (or the text
config's). A model type without an adapter is refused, never guessed.

Logits are not this module's business: the probe takes them from the model's
own forward (head and post-processing as the model applies them).

Built in: Llama-style ``q_proj/k_proj/v_proj/o_proj`` families (Llama,
Mistral, Mixtral, Qwen2/2.5/3 and MoE, Qwen3-Next's attention layers, Gemma
1-4, OLMo, Phi, StarCoder2, Granite, Cohere, ...), GPT-2 (fused ``c_attn``
Conv1D), GPT-NeoX and BLOOM (per-head interleaved ``query_key_value``),
Falcon (old and new fused layouts), GPT-BigCode (multi-query ``c_attn``) and
Phi-3 (fused ``qkv_proj``). Others: :func:`register_adapter`.

Per layer, what cannot be probed is refused with the reason and the layers
that can: linear-attention / recurrent / convolution layers (``layer_types``)
and K/V of KV-sharing layers (Gemma-3n/4), which reuse an earlier layer's keys.

>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> resolved = resolve_model(tiny_causal_lm("gpt_neox", num_layers=2))
>>> resolved.num_layers, sorted(resolved.projections(1))
(2, ['k', 'o', 'q', 'v'])
>>> rank_one_exact(resolved, 1), rank_one_exact(resolved, 0)
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inversion_monitor.proto.vocabulary import PROJECTIONS

SOFTMAX_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
"""``config.layer_types`` entries of ordinary (softmax) attention layers."""

_MLP_ONLY_LAYER_TYPES = ("dense", "sparse")  # layer_types describing the MLP only
# attention beside a recurrent state in one block: probeable, never rank one
_HYBRID_LAYER_TYPES = ("hybrid", "hybrid_sliding")


@dataclass(frozen=True)
class ProjectionSite:
    """A projection: ``module`` computes ``y = W x (+ b)``; ``columns`` selects its outputs.

    ``columns`` is None when the module computes only this projection, or a
    LongTensor of output-feature indices when several projections are fused.
    """

    module: nn.Module
    columns: torch.Tensor | None = None


def select_columns(tensor: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """The last dimension of ``tensor`` cut to a site's ``columns`` (None: all of it).

    >>> select_columns(torch.arange(6).reshape(2, 3), torch.tensor([2, 0])).tolist()
    [[2, 0], [5, 3]]
    """
    return tensor if columns is None else tensor.index_select(-1, columns.to(tensor.device))


BlockProjections = Callable[[nn.Module, Any], dict[str, ProjectionSite]]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to find the decoder blocks and their projections for one family.

    Attributes:
        name: shown in messages.
        layers: text decoder -> every decoder block, in order.
        projections: ``(block, text_config)`` -> the block's sites by
            projection name (absent names cannot be probed in that block).
        position_wise_tail: the adapter vouches that in this family everything
            after a block's attention output (the rest of the block, the final
            norm and the head) acts on each position separately. Only then is
            the last block's Q/O gradient rank one (see :func:`rank_one_exact`).
            Default False: the general path, exact for any model.

    >>> adapter = ArchitectureAdapter(
    ...     name="my-llama-like",
    ...     layers=lambda base: list(base.layers),
    ...     projections=lambda block, config: llama_style_projections(child(block, "self_attn")),
    ... )
    >>> register_adapter("my_model_type", adapter)
    >>> unregister_adapter("my_model_type")
    """

    name: str
    layers: Callable[[nn.Module], Sequence[nn.Module]]
    projections: BlockProjections
    position_wise_tail: bool = False


def child(module: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (e.g. ``"attn.c_attn"``); AttributeError if absent.

    >>> child(nn.Sequential(nn.Linear(2, 2)), "0").out_features
    2
    """
    current = module
    for name in path.split("."):
        current = getattr(current, name, None)  # type: ignore[assignment]
        if not isinstance(current, nn.Module):
            raise AttributeError(f"{type(module).__name__} has no submodule {path!r}")
    return current


def _module_list(module: nn.Module, name: str) -> Sequence[nn.Module]:
    layers = getattr(module, name, None)
    if not isinstance(layers, nn.ModuleList):
        raise AttributeError(f"{type(module).__name__} has no ModuleList {name!r}")
    return list(layers)


def _unwrap_peft(module: nn.Module) -> nn.Module:
    """A PEFT tuner layer (LoRA & co.) wraps the frozen base projection."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def _site(module: nn.Module, columns: torch.Tensor | None = None) -> ProjectionSite:
    return ProjectionSite(module=_unwrap_peft(module), columns=columns)


def _int_attr(module: nn.Module, name: str) -> int:
    value = getattr(module, name, None)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AttributeError(f"{type(module).__name__} has no int attribute {name!r}")
    return value


def llama_style_projections(attention: nn.Module) -> dict[str, ProjectionSite]:
    """Separate ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``/``out_proj``/``dense``.

    Projections the attention module does not have (K/V of a KV-sharing
    layer) are left out; Q and O must exist.
    """
    out_name = next((n for n in ("o_proj", "out_proj", "dense") if hasattr(attention, n)), "o_proj")
    sites = {"q": _site(child(attention, "q_proj")), "o": _site(child(attention, out_name))}
    for proj, name in (("k", "k_proj"), ("v", "v_proj")):
        if isinstance(getattr(attention, name, None), nn.Module):
            sites[proj] = _site(child(attention, name))
    return sites


_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def _find_attention(block: nn.Module) -> nn.Module:
    for name in _ATTENTION_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise AttributeError(
        f"{type(block).__name__} has no attention submodule "
        f"(looked for {', '.join(_ATTENTION_NAMES)})"
    )


def _generic_layers(base: nn.Module) -> Sequence[nn.Module]:
    for name in ("layers", "h", "blocks", "block"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return _module_list(base, name)
    decoder = getattr(base, "decoder", None)
    if isinstance(decoder, nn.Module):
        return _generic_layers(decoder)
    raise AttributeError(f"no decoder-block list found in {type(base).__name__}")


def _llama_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    return llama_style_projections(_find_attention(block))


def _gpt2_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    fused = child(block, "attn.c_attn")
    width = _int_attr(child(block, "attn"), "split_size")
    cols = torch.arange(3 * width)
    return {
        "q": _site(fused, cols[:width]),
        "k": _site(fused, cols[width : 2 * width]),
        "v": _site(fused, cols[2 * width :]),
        "o": _site(child(block, "attn.c_proj")),
    }


def _per_head_interleaved(fused: nn.Module, heads: int, head_dim: int) -> dict[str, ProjectionSite]:
    """``[heads, 3, head_dim]`` output layout: q | k | v inside each head (NeoX, BLOOM)."""
    per_head = torch.arange(heads * 3 * head_dim).view(heads, 3, head_dim)
    return {p: _site(fused, per_head[:, i].reshape(-1)) for i, p in enumerate(("q", "k", "v"))}


def _gpt_neox_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    attention = child(block, "attention")
    head_dim = _int_attr(attention, "head_size")
    heads = int(config.num_attention_heads)
    sites = _per_head_interleaved(child(attention, "query_key_value"), heads, head_dim)
    return {**sites, "o": _site(child(attention, "dense"))}


def _bloom_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    # BloomAttention._reshape views query_key_value as [heads, 3, head_dim]
    attention = child(block, "self_attention")
    heads, head_dim = _int_attr(attention, "num_heads"), _int_attr(attention, "head_dim")
    sites = _per_head_interleaved(child(attention, "query_key_value"), heads, head_dim)
    return {**sites, "o": _site(child(attention, "dense"))}


def _out_features(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise AttributeError(f"{type(module).__name__} has no 2-D weight")
    return int(weight.shape[0])


def _falcon_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    # FalconAttention._split_heads, the three layouts of query_key_value
    attention = child(block, "self_attention")
    fused = child(attention, "query_key_value")
    heads, head_dim = _int_attr(attention, "num_heads"), _int_attr(attention, "head_dim")
    width = _out_features(fused)
    if getattr(attention, "new_decoder_architecture", False):
        groups = _int_attr(attention, "num_kv_heads")
        per_group = torch.arange(width).view(groups, heads // groups + 2, head_dim)
        q, k, v = per_group[:, :-2], per_group[:, -2], per_group[:, -1]
    elif getattr(attention, "multi_query", False):
        flat = torch.arange(width).view(heads + 2, head_dim)
        q, k, v = flat[:-2], flat[-2], flat[-1]
    else:
        per_head = torch.arange(width).view(heads, 3, head_dim)
        q, k, v = per_head[:, 0], per_head[:, 1], per_head[:, 2]
    return {
        "q": _site(fused, q.reshape(-1)),
        "k": _site(fused, k.reshape(-1)),
        "v": _site(fused, v.reshape(-1)),
        "o": _site(child(attention, "dense")),
    }


def _gpt_bigcode_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    # GPTBigCodeAttention.forward: multi-query splits [embed | kv_dim | kv_dim],
    # otherwise the output is viewed as [heads, 3 * head_dim] (q | k | v per head)
    attention = child(block, "attn")
    fused = child(attention, "c_attn")
    heads, head_dim = _int_attr(attention, "num_heads"), _int_attr(attention, "head_dim")
    if getattr(attention, "multi_query", False):
        embed, kv = _int_attr(attention, "embed_dim"), _int_attr(attention, "kv_dim")
        cols = torch.arange(embed + 2 * kv)
        sites = {
            "q": _site(fused, cols[:embed]),
            "k": _site(fused, cols[embed : embed + kv]),
            "v": _site(fused, cols[embed + kv :]),
        }
    else:
        sites = _per_head_interleaved(fused, heads, head_dim)
    return {**sites, "o": _site(child(attention, "c_proj"))}


def _phi3_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    fused = child(block, "self_attn.qkv_proj")
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    q_width = int(config.num_attention_heads) * head_dim
    kv_width = int(config.num_key_value_heads) * head_dim
    cols = torch.arange(q_width + 2 * kv_width)
    return {
        "q": _site(fused, cols[:q_width]),
        "k": _site(fused, cols[q_width : q_width + kv_width]),
        "v": _site(fused, cols[q_width + kv_width :]),
        "o": _site(child(block, "self_attn.o_proj")),
    }


def _blocks_in_h(base: nn.Module) -> Sequence[nn.Module]:
    """The decoder blocks of a GPT-2-like base model (``base.h``)."""
    return _module_list(base, "h")


def _blocks_in_layers(base: nn.Module) -> Sequence[nn.Module]:
    """The decoder blocks of a base model that keeps them in ``base.layers``."""
    return _module_list(base, "layers")


LLAMA_STYLE = ArchitectureAdapter("llama-style", _generic_layers, _llama_block, True)
LLAMA_STYLE_GENERAL = ArchitectureAdapter(
    "llama-style (general path)", _generic_layers, _llama_block
)
GPT2 = ArchitectureAdapter("gpt2", _blocks_in_h, _gpt2_block, True)
GPT_NEOX = ArchitectureAdapter("gpt_neox", _blocks_in_layers, _gpt_neox_block, True)
PHI3 = ArchitectureAdapter("phi3", _blocks_in_layers, _phi3_block, True)
BLOOM = ArchitectureAdapter("bloom", _blocks_in_h, _bloom_block, True)
FALCON = ArchitectureAdapter("falcon", _blocks_in_h, _falcon_block, True)
GPT_BIGCODE = ArchitectureAdapter("gpt_bigcode", _blocks_in_h, _gpt_bigcode_block, True)

# Families whose decoder blocks are attention (q_proj/k_proj/v_proj/o_proj) + a
# per-token MLP or MoE, with only a norm and the head after the last block.
_LLAMA_STYLE_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "qwen3_next",  # hybrid: its linear-attention layers are refused per layer
    "qwen2_vl_text",
    "qwen2_5_vl_text",
    "qwen3_vl_text",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma4_text",
    "olmo",
    "olmo2",
    "olmo3",
    "phi",
    "starcoder2",
    "granite",
    "granitemoe",
    "cohere",
    "cohere2",
    "smollm3",
    "ministral",
    "glm",
    "glm4",
    "helium",
    "stablelm",
    "exaone4",
    "hyperclovax",
)
# Llama-style attention, but extra per-layer machinery the adapter does not vouch
# for: always the general path.
_LLAMA_STYLE_GENERAL_TYPES = (
    "gemma3n_text",  # AltUp / Laurel around the blocks
    "falcon_h1",  # a Mamba mixer beside the attention in every block
)

_ADAPTERS: dict[str, ArchitectureAdapter] = {
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "phi3": PHI3,
    "bloom": BLOOM,
    "falcon": FALCON,
    "gpt_bigcode": GPT_BIGCODE,
    **dict.fromkeys(_LLAMA_STYLE_TYPES, LLAMA_STYLE),
    **dict.fromkeys(_LLAMA_STYLE_GENERAL_TYPES, LLAMA_STYLE_GENERAL),
}


def register_adapter(model_type: str, adapter: ArchitectureAdapter) -> None:
    """Use ``adapter`` for models whose ``config.model_type`` is ``model_type``."""
    if not isinstance(adapter, ArchitectureAdapter):
        raise TypeError(f"adapter must be an ArchitectureAdapter, got {type(adapter).__name__}")
    _ADAPTERS[model_type] = adapter


def unregister_adapter(model_type: str) -> None:
    """Forget the adapter registered for ``model_type`` (no error if none)."""
    _ADAPTERS.pop(model_type, None)


FSDP1_REFUSAL = (
    "the probe does not support FSDP1 (FullyShardedDataParallel, flat parameters): switch to "
    "FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version: 2; Lightning: "
    "ModelParallelStrategy), which the probe supports"
)


def _is_fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel" or hasattr(
        module, "_fsdp_wrapped_module"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP, DeepSpeed, ``torch.compile`` and PEFT wrappers.

    FSDP2 (``fully_shard``) needs no unwrapping: the model keeps its class's
    interface and its forward gathers the shards. FSDP1 is refused.
    """
    for _ in range(8):
        if _is_fsdp1(model):
            raise NotImplementedError(FSDP1_REFUSAL)
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif type(model).__name__ == "DeepSpeedEngine" and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = child(model, "module")
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = child(model, "_orig_mod")
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            base = model.get_base_model()  # type: ignore[operator]
            if not isinstance(base, nn.Module):
                raise TypeError(f"get_base_model() of {type(model).__name__} returned no module")
            model = base
        else:
            break
    if any(_is_fsdp1(m) for m in model.modules()):
        raise NotImplementedError(FSDP1_REFUSAL)
    return model


@dataclass(frozen=True)
class ResolvedModel:
    """A causal LM with its text decoder, blocks and output embedding located.

    ``config`` is the text decoder's config (the model's own config for a
    plain causal LM, ``text_config`` inside a multimodal wrapper).
    """

    model: nn.Module
    model_type: str
    adapter: ArchitectureAdapter
    decoder: nn.Module
    blocks: Sequence[nn.Module]
    head: nn.Module
    config: Any

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_index(self, layer: int) -> int:
        """A non-negative block index; negative counts from the end (-1 = last)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must contain ints, got {layer!r}")
        index = layer + self.num_layers if layer < 0 else layer
        if not 0 <= index < self.num_layers:
            raise ValueError(
                f"layer {layer} is out of range for a model with {self.num_layers} decoder "
                f"blocks (use 0..{self.num_layers - 1}, or negative indices from the end)"
            )
        return index

    def layer_type(self, layer: int) -> str | None:
        """The block's declared ``config.layer_types`` entry, None when undeclared."""
        types = getattr(self.config, "layer_types", None)
        if not isinstance(types, list | tuple) or len(types) != self.num_layers:
            return None
        return str(types[self.layer_index(layer)])

    def _is_attention_layer(self, index: int) -> bool:
        kind = self.layer_type(index)
        return kind is None or kind in (
            SOFTMAX_ATTENTION_LAYER_TYPES + _MLP_ONLY_LAYER_TYPES + _HYBRID_LAYER_TYPES
        )

    def probeable_layers(self, projection: str) -> list[int]:
        """The block indices where ``projection`` can be probed."""
        found = []
        for index in range(self.num_layers):
            try:
                self.site(index, projection)
            except NotImplementedError:
                continue
            found.append(index)
        return found

    def projections(self, layer: int) -> dict[str, ProjectionSite]:
        """The Q/K/V/O sites of decoder block ``layer`` (those it has).

        Raises NotImplementedError, with the reason, for a block that is no
        softmax-attention layer.
        """
        index = self.layer_index(layer)
        block = self.blocks[index]
        if not self._is_attention_layer(index):
            attention = [i for i in range(self.num_layers) if self._is_attention_layer(i)]
            raise NotImplementedError(
                f"layer {index} of this {self.model_type} model is a {self.layer_type(index)!r} "
                f"layer ({type(block).__name__}): it has no softmax-attention Q/K/V/O to probe. "
                f"Its attention layers are {attention}: pass layers from those"
                + (f" (e.g. layers=[{attention[-1]}])" if attention else "")
            )
        try:
            return self.adapter.projections(block, self.config)
        except AttributeError as exc:
            raise NotImplementedError(
                f"layer {index} ({type(block).__name__}) has no projections where the "
                f"{self.adapter.name!r} adapter looks ({exc}): probe other layers, or register "
                "an adapter for this model type (inversion_monitor.register_adapter)"
            ) from None

    def site(self, layer: int, projection: str) -> ProjectionSite:
        """Where ``projection`` of block ``layer`` is computed; refused with the reason."""
        index = self.layer_index(layer)
        sites = self.projections(index)
        if projection in sites:
            return sites[projection]
        attention = _find_attention_or_none(self.blocks[index])
        if projection in ("k", "v") and getattr(attention, "is_kv_shared_layer", False):
            owners = [
                i
                for i in range(self.num_layers)
                if not getattr(_find_attention_or_none(self.blocks[i]), "is_kv_shared_layer", True)
            ]
            raise NotImplementedError(
                f"layer {index} ({type(attention).__name__}) shares keys and values with an "
                f"earlier layer (KV sharing): it has no {projection}_proj of its own, so there "
                f"is no {projection.upper()} gradient there. Probe q/o at layer {index}, or "
                f"{projection} at layers {owners}"
            )
        raise NotImplementedError(
            f"layer {index} ({type(self.blocks[index]).__name__}) has no {projection!r} "
            f"projection; it has {sorted(sites)}: probe those there"
        )


def _find_attention_or_none(block: nn.Module) -> nn.Module | None:
    try:
        return _find_attention(block)
    except AttributeError:
        return None


def positions_mix_after(resolved: ResolvedModel, layer: int) -> str | None:
    """Why something after block ``layer``'s attention may mix positions; None if nothing does.

    None means: from the attention output of block ``layer`` to the logits,
    every operation acts on each position separately, so the gradient of the
    logit at t reaches that block's query and output projections only at
    position t (their gradient is rank one: ``g_t x_t^T``). This is the single
    eligibility rule of every last-block fast path. It holds only when the
    adapter vouches for the family (:attr:`ArchitectureAdapter.position_wise_tail`),
    the block is the last of the model's decoder, the decoder holds the number
    of blocks its config declares, and the block is a declared softmax-attention
    layer (hybrid ``layer_types``).

    >>> from inversion_monitor.toy.models import tiny_causal_lm
    >>> resolved = resolve_model(tiny_causal_lm("llama", num_layers=2))
    >>> positions_mix_after(resolved, 0)
    'block 1 comes after block 0 and mixes positions'
    """
    index = resolved.layer_index(layer)
    if not resolved.adapter.position_wise_tail:
        return (
            f"the {resolved.adapter.name!r} adapter does not vouch that everything after the "
            "attention acts per position"
        )
    last = resolved.num_layers - 1
    if index != last:
        later = f"block {last}" if index + 1 == last else f"blocks {index + 1}..{last}"
        verb = "comes" if index + 1 == last else "come"
        return f"{later} {verb} after block {index} and mixes positions"
    declared = getattr(resolved.config, "num_hidden_layers", None)
    if isinstance(declared, int) and declared != resolved.num_layers:
        return (
            f"the adapter found {resolved.num_layers} blocks but the config declares {declared}; "
            "blocks it does not list may mix positions"
        )
    kind = resolved.layer_type(index)
    if kind is not None and kind not in SOFTMAX_ATTENTION_LAYER_TYPES + _MLP_ONLY_LAYER_TYPES:
        return f"block {index} is a {kind!r} layer (not only softmax attention)"
    return None


def rank_one_exact(resolved: ResolvedModel, layer: int) -> bool:
    """Whether block ``layer``'s Q and O gradients are rank one (:func:`positions_mix_after`)."""
    return positions_mix_after(resolved, layer) is None


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            text = get(decoder=True)
        except (TypeError, ValueError):
            text = None
        if text is not None:
            return text
    return config


def _decoder(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        decoder = getattr(model, "base_model", None)
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def resolve_model(model: nn.Module) -> ResolvedModel:
    """Locate everything the probe needs in ``model`` (any supported wrapper)."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    decoder = _decoder(inner)
    if config is None or not isinstance(head, nn.Module) or decoder is None:
        raise TypeError(
            f"expected a Hugging Face causal LM (with .config, a decoder and an output "
            f"embedding), got {type(inner).__name__}"
        )
    model_type = str(getattr(config, "model_type", type(inner).__name__))
    text_config = _text_config(config)
    text_type = str(getattr(text_config, "model_type", model_type))
    adapter = _ADAPTERS.get(model_type)
    if adapter is None and text_config is not config:
        adapter = _ADAPTERS.get(text_type)  # a multimodal wrapper around a known text decoder
    if adapter is None:
        named = model_type if text_type == model_type else f"{model_type} (text: {text_type})"
        raise NotImplementedError(
            f"no architecture adapter for model_type {named} ({type(inner).__name__}): "
            "register one with inversion_monitor.register_adapter(model_type, "
            "ArchitectureAdapter(name, layers=..., projections=...)) telling where its decoder "
            "blocks and Q/K/V/O projections are"
        )
    try:
        blocks = list(adapter.layers(decoder))
    except (AttributeError, TypeError) as exc:
        raise NotImplementedError(
            f"the {adapter.name!r} adapter found no decoder blocks in {type(decoder).__name__} "
            f"({exc}): register a matching adapter for model_type {model_type!r}"
        ) from None
    if not blocks:
        raise NotImplementedError(f"{type(decoder).__name__} has no decoder blocks to probe")
    resolved = ResolvedModel(
        model=inner,
        model_type=model_type,
        adapter=adapter,
        decoder=decoder,
        blocks=blocks,
        head=head,
        config=text_config,
    )
    if not any(resolved.probeable_layers(p) for p in PROJECTIONS):
        try:
            resolved.site(-1, "q")
        except NotImplementedError as exc:
            raise NotImplementedError(
                f"no block of this {model_type} model can be probed; the last: {exc}"
            ) from None
    return resolved
