"""Replaying the model's attention function for the last block's targets, one per batch element.

For the one-pass last-block path (:mod:`~inversion_monitor.probe.last_block`):
the model's own attention function (recorded by
:mod:`~inversion_monitor.probe.attention_capture`) is replayed with one target
per batch element: its query row, its sequence's keys and values (one copy per
batch row, expanded; cut after the last position its mask row lets through),
its mask row. One backward of the replay with cotangent ``g_t`` gives
``dz_t/dk_s = sum_h w_ts^h q_t^h`` and ``dz_t/dv_s = sum_h a_ts^h g_t^h`` per
key/value head (:func:`head_terms`). With G query heads per key/value head, G
extra head-dimension columns separate the heads at no change to scores or
outputs: ``q' = [q_t, e_i(h)]``, ``k' = [k_s, 0]``, ``v' = [v_s, 0]`` and
cotangent ``[g_t, e_i(h)]`` put ``w_ts^h`` and ``a_ts^h`` in the extra columns
of ``dk'`` and ``dv'``. Every replay's output rows are checked against the
recorded forward (and its ``dz/dq`` against the model's backward when asked);
any mismatch raises :class:`LastBlockRefused`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from inversion_monitor.probe.attention_capture import AttentionCall

# fp32 elements of one replay's key and value gradients ([targets, heads, span, 2d + 2G]): 8 MiB
_MAX_REPLAY_ELEMENTS = 1 << 21


class LastBlockRefused(RuntimeError):
    """The last-block path cannot compute these norms exactly; the reason is the message."""


@dataclass
class UniqueTargets:
    """Unique targets: their rows in the forward batch, positions, and where they go."""

    rows: torch.Tensor  # [U] row of the forward batch
    t: torch.Tensor  # [U]
    inverse: torch.Tensor  # [N] index into the unique targets of each requested target


def _check_close(
    got: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype | None = None
) -> None:
    """Raise :class:`LastBlockRefused` unless ``got`` matches ``expected`` (recorded in
    ``dtype``, by default its own) to that precision's tolerance."""
    dtype = expected.dtype if dtype is None else dtype
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    got, expected = got.detach().float(), expected.detach().float()
    scale = float(expected.norm())
    error = float((got - expected).norm())
    if not error <= tolerance * max(scale, 1e-6):
        raise LastBlockRefused(
            f"replaying the attention function does not reproduce {what} "
            f"(relative error {error / max(scale, 1e-30):.2e})"
        )


def check_shapes(call: AttentionCall) -> None:
    q, k, v, o = call.query, call.key, call.value, call.output
    ok = (
        q.ndim == k.ndim == v.ndim == o.ndim == 4
        and k.shape[:3] == v.shape[:3]
        and q.shape[0] == k.shape[0] == o.shape[0]
        and q.shape[2] == k.shape[2] == o.shape[1]
        and q.shape[1] % k.shape[1] == 0
        and o.shape[2] == q.shape[1]
        and o.shape[3] == v.shape[3]
        and q.shape[3] == k.shape[3]
    )
    mask = call.attention_mask
    if mask is not None:
        ok = ok and mask.ndim == 4 and mask.shape[-1] == k.shape[2] and mask.shape[-2] == q.shape[2]
    if not ok:
        raise LastBlockRefused(
            "unexpected attention shapes: query "
            f"{tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}, output "
            f"{tuple(o.shape)}, mask {None if mask is None else tuple(mask.shape)}"
        )


def _blocked(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask (boolean keep, or additive float) gives a key exactly zero weight."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask <= torch.finfo(mask.dtype).min


def _mask_rows(
    call: AttentionCall, rows: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The mask row of each target (batch row ``rows[k]``, query ``t[k]``) as the
    function takes it (``[n, heads or 1, 1, T]``; float masks as fp32; None where the
    recorded call had none), and ``[n]``: 1 + the last key position it lets through."""
    mask = call.attention_mask
    length = call.key.shape[2]
    if mask is not None:
        mask_rows = rows if mask.shape[0] > 1 else torch.zeros_like(rows)
        picked = mask[mask_rows, :, t]  # [n, heads or 1, T]
        open_ = ~_blocked(picked).any(1)
        positions = torch.arange(1, length + 1, device=picked.device)
        support = (open_ * positions).amax(-1).clamp_min(1)
        if picked.is_floating_point():
            picked = picked.float()
        return picked[:, :, None], support
    sdpa = call.implementation == "sdpa"
    causal = call.kwargs.get("is_causal")
    causal = getattr(call.module, "is_causal", True) if causal is None else causal
    if sdpa and causal:  # the recorded call relied on is_causal with a full square
        keep = torch.arange(length, device=t.device)[None, :] <= t[:, None]
        return keep[:, None, None], t + 1
    return None, torch.full_like(t, length)


@dataclass(frozen=True)
class SummedTermsChunk:
    """``summed[index, :, :span]`` for some targets: ``values`` ``[n, Hkv, span, d]``."""

    index: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class HeadTerms:
    """One projection's attention-side terms for every target.

    ``summed`` (``[U, Hkv, T, d]``, zero beyond each piece's span, kept as
    :class:`SummedTermsChunk` s) is ``dz/dtensor`` from the replay's own backward (query
    heads of a group added up); per query head, ``summed[:, j, s] = sum_{h in
    group j} weights[:, h, s] * vectors[:, h]`` with ``weights`` ``[U, H, T]``,
    ``vectors`` ``[U, H, d]``.
    """

    weights: torch.Tensor
    vectors: torch.Tensor
    pieces: list[SummedTermsChunk]


def _replay_chunks(
    rows: torch.Tensor, support: torch.Tensor, per_position: int
) -> Iterator[torch.Tensor]:
    """Target indices grouped by batch row, sorted by support, in bounded chunks."""
    order = torch.argsort(rows * (int(support.max()) + 1) + support)
    spans, row_of = support[order].tolist(), rows[order].tolist()
    start = 0
    while start < len(spans):
        end = start + 1
        while (
            end < len(spans)
            and row_of[end] == row_of[start]
            and (end + 1 - start) * spans[end] * per_position <= _MAX_REPLAY_ELEMENTS
        ):
            end += 1
        yield order[start:end]
        start = end


def head_terms(
    call: AttentionCall, g: torch.Tensor, dq: torch.Tensor | None, unique: UniqueTargets
) -> tuple[HeadTerms, HeadTerms, torch.Tensor]:
    """The key terms (score gradients w, queries q), value terms (probabilities a, g) and
    ``dz/dq`` ``[U, H, d]`` of every target.

    One replay with one target per batch element (its query row; its sequence's
    keys and values, shared by the targets of a row, up to the last position its
    mask row lets through; that mask row) and one backward with cotangent
    ``g_t``: ``dk``/``dv`` are the summed terms. The head dimension gets ``G``
    (query heads per key/value head) extra columns: one-hot by head within its
    group on the query and output-cotangent sides, zero on keys and values, so
    scores and outputs are unchanged while the extra columns of ``dk`` and ``dv``
    hold ``w`` and ``a`` of each query head separately. ``dq``: the recorded
    ``dz/dq`` (of the summed targets) to check the replay's against, or None.
    """
    _, heads, length, dim = call.query.shape
    kv_heads, dim_v = call.key.shape[1], call.value.shape[-1]
    groups = heads // kv_heads
    count = unique.t.shape[0]
    device = call.query.device
    masks, support = _mask_rows(call, unique.rows, unique.t)
    w = torch.zeros((count, heads, length), device=device)
    a = torch.zeros((count, heads, length), device=device)
    query_grads = torch.zeros((count, heads, dim), device=device)
    key_pieces: list[SummedTermsChunk] = []
    value_pieces: list[SummedTermsChunk] = []
    one_hot = torch.eye(groups, device=device).repeat(kv_heads, 1)  # [H, G]: head h -> h % G
    per_position = kv_heads * (dim + dim_v + 2 * groups)
    for index in _replay_chunks(unique.rows, support, per_position):
        row, t = int(unique.rows[index[0]]), unique.t[index]
        span = int(support[index].max())
        n = index.numel()
        q = call.query[row, :, t].detach().float().transpose(0, 1)  # [n, H, d]
        q_aug = torch.cat([q, one_hot.expand(n, -1, -1)], -1)[:, :, None].requires_grad_(True)
        zeros = q.new_zeros((1, kv_heads, span, groups))
        key = call.key[row : row + 1, :, :span].detach().float()
        value = call.value[row : row + 1, :, :span].detach().float()
        # one copy per batch row, seen by its n targets (gradients come per target)
        k_row = torch.cat([key, zeros], -1).requires_grad_(True)
        v_row = torch.cat([value, zeros], -1).requires_grad_(True)
        mask = None if masks is None else masks[index, ..., :span]
        with torch.enable_grad():
            k_aug, v_aug = k_row.expand(n, -1, -1, -1), v_row.expand(n, -1, -1, -1)
            try:
                out = call.replay(q_aug, k_aug, v_aug, mask)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise LastBlockRefused(f"replaying the attention function failed: {exc}") from exc
        if tuple(out.shape) != (n, 1, heads, dim_v + groups):
            raise LastBlockRefused(f"the replayed attention returned shape {tuple(out.shape)}")
        expected = call.output[row, t].detach().float()  # [n, H, dv]
        _check_close(out[:, 0], _pad(expected, groups), "the attention output", call.output.dtype)
        cotangent = torch.cat([g[row, t].float(), one_hot.expand(n, -1, -1)], -1)[:, None]
        dq_aug, dk_aug, dv_aug = torch.autograd.grad(out, (q_aug, k_aug, v_aug), cotangent)
        if dq is not None:
            recorded_dq = _pad(dq[row, :, t].transpose(0, 1), groups)
            _check_close(dq_aug[:, :, 0], recorded_dq, "dz/dq", dq.dtype)
        query_grads[index] = dq_aug[:, :, 0, :dim]
        key_pieces.append(SummedTermsChunk(index, dk_aug[..., :dim]))
        value_pieces.append(SummedTermsChunk(index, dv_aug[..., :dim_v]))
        # extra column i of key/value head j: query head j * G + i
        w[index, :, :span] = dk_aug[..., dim:].permute(0, 1, 3, 2).reshape(n, heads, span)
        a[index, :, :span] = dv_aug[..., dim_v:].permute(0, 1, 3, 2).reshape(n, heads, span)
    q_rows = call.query[unique.rows, :, unique.t].detach().float()  # [U, H, d]
    g_rows = g[unique.rows, unique.t].float()  # [U, H, dv]
    return HeadTerms(w, q_rows, key_pieces), HeadTerms(a, g_rows, value_pieces), query_grads


def _pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([tensor.float(), tensor.new_zeros((*tensor.shape[:-1], columns)).float()], -1)
