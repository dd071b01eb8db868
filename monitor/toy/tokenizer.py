"""A character-level tokenizer built locally (no downloads).

>>> tok = char_tokenizer()
>>> ids = tok("Q: 2+3=?")["input_ids"]
>>> tok.decode(ids, skip_special_tokens=True)
'Q: 2+3=?'
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# every printable ASCII character except the rarely useful vertical whitespace
CHARACTERS = tuple(c for c in string.printable if c not in "\r\x0b\x0c\t")
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)


def char_tokenizer(*, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per printable ASCII character.

    ``pad`` has id 0, ``bos`` 1, ``eos`` 2, ``unk`` 3; ``add_bos`` prepends
    ``<s>`` to every encoded text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )
