"""Tiny randomly initialised causal LMs built from configs (no downloads).

>>> model = tiny_causal_lm("gpt2", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2)
>>> model.config.model_type
'gpt2'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from inversion_monitor.toy.tokenizer import VOCAB_SIZE

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

Architecture = Literal["llama", "qwen2", "gpt2", "gpt_neox"]
ARCHITECTURES: tuple[Architecture, ...] = ("llama", "qwen2", "gpt2", "gpt_neox")


def tiny_config(
    arch: Architecture,
    *,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
) -> PretrainedConfig:
    """The config of a tiny model of architecture ``arch``.

    Llama and Qwen2 get grouped-query attention (half as many KV heads) so the
    K/V projections are narrower than Q, as in real models. The MLP is
    ``intermediate_size`` wide (None: twice ``hidden_size``; GPT-2: its own default, 4x).
    """
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config: PretrainedConfig
    if arch in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        config = cls(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            n_inner=intermediate_size,
            **common,
        )
    elif arch == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_positions,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
            tie_word_embeddings=False,
            **common,
        )
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    config._attn_implementation = attn_implementation
    return config


def tiny_causal_lm(
    arch: Architecture,
    *,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    intermediate_size: int | None = None,
) -> PreTrainedModel:
    """A tiny causal LM of architecture ``arch`` with weights drawn from ``seed``.

    The global torch RNG is saved and restored, so building a model never
    changes the caller's random stream.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        attn_implementation=attn_implementation,
        intermediate_size=intermediate_size,
    )
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only (restored by the fork); torch.manual_seed would also
        # reseed every CUDA generator, which the fork does not restore
        torch.default_generator.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model
