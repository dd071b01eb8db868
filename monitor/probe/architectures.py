"""Where the attention projections of each architecture live.

The probe needs, for every decoder block, the module computing each of the
Q, K, V and O projections and, for fused modules, which output features
belong to which projection. An :class:`ArchitectureAdapter` answers that for
one family; :func:`resolve_model` unwraps DDP / ``torch.compile`` / PEFT and
picks the adapter from ``config.model_type``.

Built in: Llama-style ``q_proj/k_proj/v_proj/o_proj`` (Llama, Mistral,
Mixtral, Qwen2/2.5/3, Gemma 1-3, OLMo, Phi, StarCoder2, ...), GPT-2 (fused
``c_attn`` Conv1D), GPT-NeoX (per-head interleaved ``query_key_value``) and
Phi-3 (fused ``qkv_proj``). Others: :func:`register_adapter`.

>>> from inversion_monitor.app.toy.models import tiny_causal_lm
>>> resolved = resolve_model(tiny_causal_lm("gpt_neox", num_layers=2))
>>> resolved.num_layers, sorted(resolved.projections(1))
(2, ['k', 'o', 'q', 'v'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PROJECTIONS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class ProjectionSite:
    """A projection: ``module`` computes ``y = W x (+ b)``; ``columns`` selects its outputs.

    ``columns`` is None when the module computes only this projection, or a
    LongTensor of output-feature indices when several projections are fused.
    """

    module: nn.Module
    columns: torch.Tensor | None = None


BlockProjections = Callable[[nn.Module, Any], dict[str, ProjectionSite]]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How to find the decoder blocks and their projections for one family.

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


def llama_style_projections(attention: nn.Module) -> dict[str, ProjectionSite]:
    """Separate ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``/``out_proj``/``dense``."""
    out_name = next((n for n in ("o_proj", "out_proj", "dense") if hasattr(attention, n)), "o_proj")
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": out_name}
    return {proj: _site(child(attention, name)) for proj, name in names.items()}


def _find_attention(block: nn.Module) -> nn.Module:
    for name in ("self_attn", "attn", "attention", "self_attention", "mixer"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise AttributeError(f"no attention submodule found in {type(block).__name__}")


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
    width = int(config.hidden_size)
    cols = torch.arange(3 * width)
    return {
        "q": _site(fused, cols[:width]),
        "k": _site(fused, cols[width : 2 * width]),
        "v": _site(fused, cols[2 * width :]),
        "o": _site(child(block, "attn.c_proj")),
    }


def _gpt_neox_block(block: nn.Module, config: Any) -> dict[str, ProjectionSite]:
    # query_key_value's output is viewed as [heads, 3 * head_dim] and chunked
    # into q | k | v per head.
    fused = child(block, "attention.query_key_value")
    heads = int(config.num_attention_heads)
    head_dim = int(config.hidden_size) // heads
    per_head = torch.arange(heads * 3 * head_dim).view(heads, 3, head_dim)
    return {
        "q": _site(fused, per_head[:, 0].reshape(-1)),
        "k": _site(fused, per_head[:, 1].reshape(-1)),
        "v": _site(fused, per_head[:, 2].reshape(-1)),
        "o": _site(child(block, "attention.dense")),
    }


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


LLAMA_STYLE = ArchitectureAdapter("llama-style", _generic_layers, _llama_block)
GPT2 = ArchitectureAdapter("gpt2", lambda base: _module_list(base, "h"), _gpt2_block)
GPT_NEOX = ArchitectureAdapter(
    "gpt_neox", lambda base: _module_list(base, "layers"), _gpt_neox_block
)
PHI3 = ArchitectureAdapter("phi3", lambda base: _module_list(base, "layers"), _phi3_block)

_ADAPTERS: dict[str, ArchitectureAdapter] = {
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "phi3": PHI3,
    **{
        model_type: LLAMA_STYLE
        for model_type in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "phi",
            "starcoder2",
            "granite",
            "cohere",
            "smollm3",
            "ministral",
        )
    },
}


def register_adapter(model_type: str, adapter: ArchitectureAdapter) -> None:
    """Use ``adapter`` for models whose ``config.model_type`` is ``model_type``."""
    if not isinstance(adapter, ArchitectureAdapter):
        raise TypeError(f"adapter must be an ArchitectureAdapter, got {type(adapter).__name__}")
    _ADAPTERS[model_type] = adapter


def unregister_adapter(model_type: str) -> None:
    """Forget the adapter registered for ``model_type`` (no error if none)."""
    _ADAPTERS.pop(model_type, None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP, ``torch.compile`` and PEFT wrappers.

    FSDP-sharded models are refused: their parameters are flattened shards.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if type(model).__name__ in ("FullyShardedDataParallel", "FSDPModule") or hasattr(
            model, "_fsdp_wrapped_module"
        ):
            raise NotImplementedError(
                "the probe cannot run on an FSDP-sharded model (its weights are flat shards); "
                "use DDP, or run the probe on an unsharded copy of the model"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = child(model, "_orig_mod")
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            base = model.get_base_model()  # type: ignore[operator]
            if not isinstance(base, nn.Module):
                raise TypeError(f"get_base_model() of {type(model).__name__} returned no module")
            model = base
        else:
            return model
    return model


@dataclass(frozen=True)
class ResolvedModel:
    """A causal LM with its decoder, blocks, head and logit post-processing located."""

    model: nn.Module
    model_type: str
    adapter: ArchitectureAdapter
    decoder: nn.Module
    blocks: Sequence[nn.Module]
    head: nn.Module
    logit_scale: float
    softcap: float | None

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

    def projections(self, layer: int) -> dict[str, ProjectionSite]:
        """The Q/K/V/O sites of decoder block ``layer``."""
        return self.adapter.projections(self.blocks[self.layer_index(layer)], self.model.config)


def resolve_model(model: nn.Module) -> ResolvedModel:
    """Locate everything the probe needs in ``model`` (any supported wrapper)."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    model_type = str(getattr(config, "model_type", type(inner).__name__))
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    decoder = getattr(inner, "base_model", None)
    if (
        config is None
        or not isinstance(head, nn.Module)
        or not isinstance(decoder, nn.Module)
        or decoder is inner
    ):
        raise TypeError(
            f"expected a Hugging Face causal LM (with .config, .base_model and an output "
            f"embedding), got {type(inner).__name__}"
        )
    adapter = _ADAPTERS.get(model_type)
    candidates = [adapter] if adapter is not None else [LLAMA_STYLE]
    for candidate in candidates:
        try:
            blocks = candidate.layers(decoder)
            candidate.projections(blocks[-1], config)
        except (AttributeError, IndexError, TypeError):
            continue
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        granite = getattr(config, "logits_scaling", None)
        if granite:
            scale /= float(granite)
        softcap = getattr(config, "final_logit_softcapping", None)
        return ResolvedModel(
            model=inner,
            model_type=model_type,
            adapter=candidate,
            decoder=decoder,
            blocks=blocks,
            head=head,
            logit_scale=scale,
            softcap=float(softcap) if softcap else None,
        )
    raise NotImplementedError(
        f"no architecture adapter for model_type {model_type!r} ({type(inner).__name__}): "
        "register one with inversion_monitor.register_adapter(model_type, "
        "ArchitectureAdapter(name, layers=..., projections=...)) telling where its decoder "
        "blocks and Q/K/V/O projections are"
    )
