"""The packed-rows check: do the training forward's packed documents attend to each other?

The probe isolates each document of a packed row (position_ids restart); when the
model's own attention lets the documents see each other, the monitor would measure a
model other than the one trained, so the engine warns once, at the first packed batch.

>>> check = PackingCheck()
>>> check.done
False
"""

from __future__ import annotations

import logging
from typing import Any

from inversion_monitor.probe.capture import CapturedBatch
from inversion_monitor.probe.packing import cross_document_attention, document_index

logger = logging.getLogger("inversion_monitor")

__all__ = ["PackingCheck", "packing_warning"]


class PackingCheck:
    """Checks the first packed batch once; later calls answer ``None``.

    Usage::

        message = check(model.config, batch)   # a warning's text, or None
    """

    def __init__(self) -> None:
        self.done = False

    def __call__(self, config: Any, batch: CapturedBatch) -> str | None:
        if self.done or batch.position_ids is None:
            return None
        self.done, message = packing_warning(config, batch)
        return message


def packing_warning(config: Any, batch: CapturedBatch) -> tuple[bool, str | None]:
    """(whether ``batch`` was packed, the warning when its documents attend to each other in
    the training forward). The probe isolates each document, so it would then measure a
    model other than the one trained. Never raises: a failed check gives no warning."""
    try:
        documents = document_index(batch.position_ids, batch.attention_mask)
        if documents is None:
            return False, None
        implementation = getattr(config, "_attn_implementation", None)
        reason = cross_document_attention(
            implementation,
            documents,
            attention_mask=batch.attention_mask,
            explicit_mask=batch.explicit_mask,
            kv_cache=batch.kv_cache,
            varlen=batch.varlen,
        )
    except Exception as exc:  # fail open
        logger.debug("inversion-monitor: packing check failed", exc_info=exc)
        return True, None
    if reason is None:
        return True, None
    return True, (
        f"inversion-monitor: the training batch packs several documents into a row "
        f"(position_ids restart) and the model's {implementation!r} attention lets them "
        f"attend to each other: {reason}. The probe isolates each document, so it measures "
        "a model different from the one being trained. To isolate them in training: "
        "attn_implementation='flash_attention_2' (varlen: one packed row per batch, or "
        "cu_seq_lens_q/k from DataCollatorWithFlattening(return_flash_attn_kwargs=True)), or "
        "an explicit block-diagonal 4-D attention_mask; with sdpa/eager, pass no 2-D "
        "attention_mask and use_cache=False and transformers builds that mask from position_ids"
    )
