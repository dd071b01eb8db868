"""Tokenized training data from the synthetic corpus, for trainers and tests.

>>> from inversion_monitor.toy.tokenizer import char_tokenizer
>>> rows = tokenized_corpus(char_tokenizer(), 3, seed=0)
>>> sorted(rows[0]), rows[0]["input_ids"][0]
(['attention_mask', 'input_ids'], 1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inversion_monitor.toy.corpus import Task, reasoning_corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenized_corpus(
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    *,
    seed: int = 0,
    max_length: int = 128,
    task: Task = "chain",
) -> list[dict[str, Any]]:
    """``n`` examples of the family ``task`` as ``{"input_ids", "attention_mask"}`` lists
    (unpadded, truncated)."""
    texts = reasoning_corpus(n, seed=seed, task=task)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]


def causal_lm_collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    """Pads a batch on the right and sets ``labels`` (padding ignored) for causal LM."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)
