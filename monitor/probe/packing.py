"""Packed rows: several documents in one row, told apart by restarting ``position_ids``.

(Belongs with the probe: ``inversion_monitor.probe.packing`` after the layout move.)

A row is packed when its ``position_ids`` do not go up by one between two
real tokens (transformers' own rule for padding-free batches, applied here
with or without an attention mask). The probe never lets documents attend to
each other: :func:`split_documents` gives each document its own row, with its
own position ids, so every model (sdpa, eager, flash) sees it alone.
:func:`cross_document_attention` says when the model's own training forward
does not (the probe then measures another model than the one trained).

>>> import torch
>>> pos = torch.tensor([[0, 1, 2, 0, 1]])
>>> document_index(pos, None)
tensor([[0, 0, 0, 1, 1]])
>>> ids = torch.tensor([[5, 6, 7, 8, 9]])
>>> docs = split_documents(ids, None, pos, torch.tensor([[0, 0], [0, 3]]))
>>> docs.input_ids.tolist(), docs.targets.tolist()
([[5, 6, 7], [8, 9, 0]], [[0, 0], [1, 0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def document_index(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """``[B, T]`` document number within each row when some row is packed, else None.

    A document starts wherever ``position_ids`` do not increase by exactly one
    from one real token to the next real token beside it; padding never
    starts a document.
    """
    if position_ids is None:
        return None
    pos = position_ids.to(torch.long)
    restart = torch.zeros_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if attention_mask is not None:
        real = attention_mask.to(pos.device) != 0
        restart[:, 1:] &= real[:, 1:] & real[:, :-1]
    if not bool(restart.any()):
        return None
    return restart.long().cumsum(1)


def same_document(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: torch.Size
) -> torch.Tensor:
    """``[B, T]`` bool: position t and t + 1 lie in the same document (last column False)."""
    documents = document_index(position_ids, attention_mask)
    out = torch.ones(shape, dtype=torch.bool)
    out[:, -1] = False
    if documents is not None:
        out = out.to(documents.device)
        out[:, :-1] &= documents[:, 1:] == documents[:, :-1]
    return out


@dataclass(frozen=True)
class Documents:
    """One right-padded row per document that holds a target.

    Attributes:
        input_ids, attention_mask, position_ids: ``[D, L]``.
        targets: ``[N, 2]`` the targets as (document row, t within it).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor


def split_documents(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    targets: torch.Tensor,
) -> Documents:
    """Cut packed rows into one row per document holding a target; targets follow.

    Every target (b, t) must have t and t + 1 in one document.
    """
    documents = document_index(position_ids, attention_mask)
    if documents is None:
        documents = torch.zeros_like(input_ids)
    documents = documents.to(input_ids.device)
    rows, ts = targets[:, 0], targets[:, 1]
    keys = rows * (int(documents.max()) + 1) + documents[rows, ts]
    unique, which = torch.unique(keys, return_inverse=True)
    spans: list[tuple[int, int, int]] = []
    for key in unique.tolist():
        row = int(rows[keys == key][0])
        inside = (documents[row] == documents[row, int(ts[keys == key][0])]).nonzero().flatten()
        spans.append((row, int(inside[0]), int(inside[-1]) + 1))
    longest = max((end - start for _, start, end in spans), default=2)
    shape = (len(spans), max(longest, 2))
    ids = input_ids.new_zeros(shape)
    mask = torch.zeros(shape, dtype=torch.long, device=input_ids.device)
    pos = torch.zeros(shape, dtype=torch.long, device=input_ids.device)
    for index, (row, start, end) in enumerate(spans):
        ids[index, : end - start] = input_ids[row, start:end]
        mask[index, : end - start] = (
            1 if attention_mask is None else attention_mask[row, start:end].to(torch.long)
        )
        pos[index, : end - start] = position_ids[row, start:end].to(input_ids.device)
    starts = torch.tensor([start for _, start, _ in spans], dtype=torch.long, device=ts.device)
    new_targets = torch.stack([which, ts - starts[which]], dim=1)
    return Documents(input_ids=ids, attention_mask=mask, position_ids=pos, targets=new_targets)


# implementations whose mask transformers' create_causal_mask builds (5.x masking_utils):
# block-diagonal from position_ids only with no 2-D attention_mask and no KV cache
_MASK_BUILT = ("sdpa", "eager", "flex_attention")


def cross_document_attention(
    implementation: str | None,
    documents: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    explicit_mask: torch.Tensor | None,
    kv_cache: bool,
    varlen: bool,
) -> str | None:
    """Why the model's training forward lets packed documents attend to each other, or None.

    ``documents`` is :func:`document_index` of the packed batch; the rest is
    what the training forward passed (``attention_mask`` 2-D, ``explicit_mask``
    4-D, a KV cache, flash-attention's ``cu_seq_lens``). The rules are
    transformers 5's: a 4-D mask is used as given (checked here: boolean,
    True = attend, or additive; eager adds even a boolean one); flash
    attention runs varlen from ``cu_seq_lens`` or, for a batch of one row with
    no padding, from restarting ``position_ids``; sdpa, eager and flex get a
    block-diagonal mask from ``position_ids`` only when neither a 2-D mask nor a
    KV cache is passed. None also when the implementation is none of these.

    >>> docs = torch.tensor([[0, 0, 1, 1]])
    >>> cross_document_attention("sdpa", docs, attention_mask=None, explicit_mask=None,
    ...                          kv_cache=True, varlen=False)
    'the forward keeps a KV cache (use_cache=True)'
    >>> print(cross_document_attention("sdpa", docs, attention_mask=None, explicit_mask=None,
    ...                                kv_cache=False, varlen=False))
    None
    """
    if explicit_mask is not None:
        length = documents.shape[1]
        if tuple(explicit_mask.shape[-2:]) != (length, length):
            return None
        if explicit_mask.dtype == torch.bool:
            if implementation == "eager":  # added to the scores as 0 / 1: nothing is masked
                return "eager attention adds the boolean 4-D attention_mask to its scores as 0/1"
            allowed = explicit_mask
        else:  # additive: a blocked pair holds -inf or the dtype's minimum
            allowed = explicit_mask > torch.finfo(explicit_mask.dtype).min / 2
        docs = documents.to(allowed.device)
        crossing = docs[:, None, :, None] != docs[:, None, None, :]
        if bool((allowed & crossing).any()):
            return "its 4-D attention_mask lets a document see the documents before it"
        return None
    name = implementation or ""
    if "flash" in name:
        if varlen:
            return None
        if attention_mask is not None and not bool(attention_mask.all()):
            return (
                "flash attention unpads by the padded attention_mask and keeps each row's "
                "documents together"
            )
        if documents.shape[0] != 1:
            return (
                f"flash attention separates documents by position_ids only in a batch of one "
                f"row, this batch has {documents.shape[0]}"
            )
        return None
    if name in _MASK_BUILT:
        if attention_mask is not None:
            return "a 2-D attention_mask is passed"
        if kv_cache:
            return "the forward keeps a KV cache (use_cache=True)"
    return None
