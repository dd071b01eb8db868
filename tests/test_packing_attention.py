"""Packed rows whose training attention lets documents see each other: one warning.

The rule (:func:`cross_document_attention`) is checked against what the
installed transformers' own forward does (brute force: does a document's
logits change when the document before it changes?), then the warning in
real HF Trainer runs and a custom loop.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from inversion_monitor.callbacks import InversionTrainerCallback
from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.training_monitor import InversionMonitor, MonitorWarning
from inversion_monitor.probe.packing import cross_document_attention, document_index
from inversion_monitor.toy.data import tokenized_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.trainers import CPU_ARGS

FIRST, SECOND = 12, 10  # two documents packed into one row


def packed_row(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, 22]`` ids of two documents (the first drawn from ``seed``) and position ids."""
    second = torch.randint(4, 100, (1, SECOND), generator=torch.Generator().manual_seed(99))
    first = torch.randint(4, 100, (1, FIRST), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(FIRST), torch.arange(SECOND)])[None]
    return torch.cat([first, second], 1), positions


def block_diagonal(positions: torch.Tensor, *, additive: bool = False) -> torch.Tensor:
    """``[1, 1, T, T]``: causal within each document, bool (True = attend) or additive."""
    docs = document_index(positions, None)
    assert docs is not None
    length = positions.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (causal & (docs[0][:, None] == docs[0][None, :]))[None, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


CASES: dict[str, dict[str, Any]] = {
    "no mask, no cache": {"use_cache": False},
    "no mask, cache": {"use_cache": True},
    "config's use_cache": {},
    "2-D all-ones mask": {"attention_mask": torch.ones(1, FIRST + SECOND, dtype=torch.long)},
    "4-D block-diagonal mask": {"block_diagonal": True, "use_cache": False},
    "4-D additive block-diagonal mask": {"additive": True, "use_cache": False},
    "4-D causal mask": {"causal_4d": True, "use_cache": False},
}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("case", list(CASES))
def test_rule_matches_what_the_models_forward_does(implementation, arch, case):
    model = tiny_causal_lm(arch, attn_implementation=implementation).eval()
    kwargs = dict(CASES[case])
    ids, positions = packed_row(0)
    other, _ = packed_row(1)
    explicit = None
    if kwargs.pop("block_diagonal", False):
        explicit = block_diagonal(positions)
    if kwargs.pop("additive", False):
        explicit = block_diagonal(positions, additive=True)
    if kwargs.pop("causal_4d", False):
        explicit = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    if explicit is not None:
        kwargs["attention_mask"] = explicit
    with torch.no_grad():
        second = model(input_ids=ids, position_ids=positions, **kwargs).logits[0, FIRST:]
        changed = model(input_ids=other, position_ids=positions, **kwargs).logits[0, FIRST:]
    crosses = not torch.allclose(second, changed)
    mask = kwargs.get("attention_mask")
    use_cache = kwargs.get("use_cache", model.config.use_cache)
    docs = document_index(positions, None)
    assert docs is not None
    reason = cross_document_attention(
        implementation,
        docs,
        attention_mask=mask if mask is not None and mask.ndim == 2 else None,
        explicit_mask=explicit,
        kv_cache=bool(use_cache),
        varlen=False,
    )
    assert crosses == (reason is not None), (case, reason)


def test_flash_rule():
    docs = torch.tensor([[0, 0, 1, 1]])
    plain: dict[str, Any] = {"attention_mask": None, "explicit_mask": None, "kv_cache": True}
    # one packed row: varlen from position_ids (a KV cache does not change that)
    assert cross_document_attention("flash_attention_2", docs, varlen=False, **plain) is None
    two_rows = docs.expand(2, -1)
    reason = cross_document_attention("flash_attention_2", two_rows, varlen=False, **plain)
    assert reason is not None and "batch of one row" in reason
    assert cross_document_attention("flash_attention_3", two_rows, varlen=True, **plain) is None
    padded = {**plain, "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    reason = cross_document_attention("flash_attention_2", docs, varlen=False, **padded)
    assert reason is not None and "unpads" in reason
    # an implementation whose rule is unknown: no claim
    assert cross_document_attention("my_kernel", docs, varlen=False, **plain) is None


def packing_trainer(tmp_path, collator: Any, callback: Any, **args: Any) -> Trainer:
    """A real HF Trainer whose batches are packed rows (DataCollatorWithFlattening)."""
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama").train()
    data = [{"input_ids": e["input_ids"]} for e in tokenized_corpus(tokenizer, 16, max_length=24)]
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        **{**CPU_ARGS, **args},
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=collator,
        callbacks=[callback],
    )


class OnesMask:
    """DataCollatorWithFlattening plus an all-ones 2-D attention_mask (as TRL's packing
    without padding_free passes it)."""

    def __init__(self) -> None:
        self.inner = DataCollatorWithFlattening()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.inner(features)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch


def packing_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, MonitorWarning) and "packs several documents" in str(w.message)
    ]


@pytest.mark.parametrize(
    ("collator", "args", "reason"),
    [
        (OnesMask, {}, "a 2-D attention_mask is passed"),
        (DataCollatorWithFlattening, {"use_cache": True}, "KV cache"),
        (DataCollatorWithFlattening, {}, None),  # transformers builds the block-diagonal mask
    ],
    ids=["ones-mask", "use-cache", "isolated"],
)
def test_trainer_warns_once_when_packed_documents_attend_to_each_other(
    tmp_path, collator, args, reason
):
    callback = InversionTrainerCallback(every_n_steps=1, tokens_per_probe=16)
    trainer = packing_trainer(tmp_path, collator(), callback, **args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    found = packing_warnings(caught)
    probed = [e for e in trainer.state.log_history if "inversion/n" in e]
    assert len(probed) == 4  # the probe went on at every step
    if reason is None:
        assert found == []
        return
    assert len(found) == 1, found
    assert "'sdpa'" in found[0] and reason in found[0]
    assert "flash_attention_2" in found[0] and "block-diagonal 4-D attention_mask" in found[0]


def custom_loop_warnings(model: torch.nn.Module, **kwargs: Any) -> list[str]:
    """Three packed training steps of a custom loop under the engine; the packing warnings."""
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=8))
    monitor.attach(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 4):
            ids, positions = packed_row(step)
            model(input_ids=ids, position_ids=positions, labels=ids, **kwargs).loss.backward()
            model.zero_grad(set_to_none=True)
            assert monitor.step_end(step, model) is not None
    monitor.close()
    return packing_warnings(caught)


def test_custom_loop_eager_with_the_configs_cache_warns_once():
    model = tiny_causal_lm("llama", attn_implementation="eager").train()
    assert model.config.use_cache  # the config's default: the forward keeps a cache
    found = custom_loop_warnings(model)
    assert len(found) == 1 and "'eager'" in found[0] and "use_cache=True" in found[0]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_custom_loop_with_a_block_diagonal_mask_does_not_warn(implementation):
    model = tiny_causal_lm("llama", attn_implementation=implementation).train()
    _, positions = packed_row(0)
    mask = block_diagonal(positions, additive=True)
    assert custom_loop_warnings(model, attention_mask=mask) == []


def test_custom_loop_eager_with_a_boolean_4d_mask_warns():
    model = tiny_causal_lm("llama", attn_implementation="eager").train()
    _, positions = packed_row(0)
    found = custom_loop_warnings(model, attention_mask=block_diagonal(positions), use_cache=False)
    assert len(found) == 1 and "adds the boolean 4-D attention_mask" in found[0]


def test_unpacked_rows_do_not_warn():
    model = tiny_causal_lm("llama").train()
    monitor = InversionMonitor(MonitorConfig(every_n_steps=1, tokens_per_probe=8))
    monitor.attach(model)
    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        assert monitor.step_end(1, model) is not None
    monitor.close()
    assert packing_warnings(caught) == []
