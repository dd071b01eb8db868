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

from dataclasses import dataclass

import torch

from inversion_monitor.probe.attention_capture import AttentionCall

# fp32 elements of one replay chunk's keys and values together ([targets, kv heads, T,
# 2d + 2G]): 80 Mi, so each of them (and its gradient) stays under the 48M-element bound on
# any intermediate (40 Mi where d = dv). Chunks are few: 256 targets at Qwen2-0.5B's shape
# (4 x 1024) are one chunk, so the count of ops does not grow with the targets there
_MAX_REPLAY_ELEMENTS = 80 << 20


class LastBlockRefused(RuntimeError):
    """The last-block path cannot compute these norms exactly; the reason is the message."""


@dataclass
class UniqueTargets:
    """Unique targets: their rows in the forward batch, positions, and where they go."""

    rows: torch.Tensor  # [U] row of the forward batch
    t: torch.Tensor  # [U]
    inverse: torch.Tensor  # [N] index into the unique targets of each requested target
    slots: torch.Tensor  # [U] rank of each target among those of its row
    packs: int  # most targets in one row (the slots' range)


class DeferredChecks:
    """Checks and route decisions computed on the device, read back together (one sync).

    :meth:`close` records a replay check (relative error within the recorded
    precision's tolerance), :meth:`flag` a boolean decision; :meth:`read` reads
    every pending value in one transfer, raises :class:`LastBlockRefused` for a
    failed check and returns the flags by name.

    >>> checks = DeferredChecks()
    >>> rows = torch.zeros(3, dtype=torch.long)
    >>> checks.close(torch.ones(3, 2), torch.ones(3, 2), rows, "x", batch=2)
    >>> checks.flag("positive", torch.tensor(2.0) > 0)
    >>> checks.read()
    {'positive': True}
    """

    def __init__(self) -> None:
        self._values: list[torch.Tensor] = []
        self._closes: list[tuple[str, int, float]] = []  # what, rows, tolerance
        self._flags: list[str] = []

    def close(
        self,
        got: torch.Tensor,
        expected: torch.Tensor,
        rows: torch.Tensor,
        what: str,
        *,
        batch: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``got`` must match ``expected`` (``[n, ...]``; recorded in ``dtype``, by default
        its own) to that precision's tolerance, relative over the entries of each batch
        row (``rows`` ``[n]`` in ``range(batch)``)."""
        dtype = expected.dtype if dtype is None else dtype
        tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        got, expected = got.detach().float(), expected.detach().float()
        # [2, n]: each entry's squared error and squared size, one stacked program (11 ops)
        sums = torch.stack([got - expected, expected]).flatten(2).square().sum(2)
        per_row = sums.new_zeros((2, batch)).index_add_(1, rows, sums)
        self._values.append(per_row.sqrt().flatten())
        self._closes.append((what, batch, tolerance))

    def flag(self, name: str, value: torch.Tensor) -> None:
        """A boolean decision (a 0-dim tensor) to read back with the rest."""
        self._values.append(value.detach().reshape(1).float())
        self._flags.append(name)

    def read(self) -> dict[str, bool]:
        """Every pending value in one read; raises on a failed check."""
        if not self._values:
            return {}
        values = torch.cat([v.to(self._values[0].device) for v in self._values]).tolist()
        self._values = []
        offset = 0
        for what, batch, tolerance in self._closes:
            errors, scales = (
                values[offset : offset + batch],
                values[offset + batch : offset + 2 * batch],
            )
            offset += 2 * batch
            for error, scale in zip(errors, scales, strict=True):
                if not error <= tolerance * max(scale, 1e-6):
                    raise LastBlockRefused(
                        f"replaying the attention function does not reproduce {what} "
                        f"(relative error {error / max(scale, 1e-30):.2e})"
                    )
        flags = {
            name: bool(value) for name, value in zip(self._flags, values[offset:], strict=True)
        }
        self._closes, self._flags = [], []
        return flags


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


def _mask_rows(call: AttentionCall, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """The mask row of each target (batch row ``rows[k]``, query ``t[k]``) as the function
    takes it (``[n, heads or 1, 1, T]``; float masks as fp32; None where the recorded
    call had none and did not rely on ``is_causal``)."""
    mask = call.attention_mask
    length = call.key.shape[2]
    if mask is not None:
        mask_rows = rows if mask.shape[0] > 1 else torch.zeros_like(rows)
        picked = mask[mask_rows, :, t]  # [n, heads or 1, T]
        if picked.is_floating_point():
            picked = picked.float()
        return picked[:, :, None]
    sdpa = call.implementation == "sdpa"
    causal = call.kwargs.get("is_causal")
    causal = getattr(call.module, "is_causal", True) if causal is None else causal
    if sdpa and causal:  # the recorded call relied on is_causal with a full square
        keep = torch.arange(length, device=t.device)[None, :] <= t[:, None]
        return keep[:, None, None]
    return None


@dataclass(frozen=True)
class HeadTerms:
    """One projection's attention-side terms for every target.

    ``dz/dtensor`` of target k at key/value head j and position s (query heads of
    the group added up; zero where a key is masked for the target) is
    ``sum_{h in group j} weights[k, h, s] * vectors[k, h]``, with ``weights``
    ``[U, H, T]`` (from the replay's own backward) and ``vectors`` ``[U, H, d]``.
    It is never held for every target at once (``[U, Hkv, T, d]`` grows with
    targets x T): :meth:`summed` builds it for a chunk of targets.
    """

    weights: torch.Tensor
    vectors: torch.Tensor

    def summed(self, kv_heads: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, Hkv, T, d]``: ``dz/dtensor`` of the targets ``index`` (None: all), fp32."""
        weights = self.weights if index is None else self.weights[index]
        vectors = self.vectors if index is None else self.vectors[index]
        return grouped_sum(weights, vectors, kv_heads)


def grouped_sum(weights: torch.Tensor, vectors: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[..., Hkv, T, d]``: ``sum_{h in group j} weights[..., h, s] * vectors[..., h, :]`` for
    ``weights`` ``[..., H, T]`` and ``vectors`` ``[..., H, d]`` (query heads grouped
    consecutively, ``H / Hkv`` per key/value head), as one batched matmul.

    >>> grouped_sum(torch.ones(2, 4, 3), torch.ones(2, 4, 5), 2).shape
    torch.Size([2, 2, 3, 5])
    """
    *lead, heads, length = weights.shape
    groups = heads // kv_heads
    w = weights.float().reshape(*lead, kv_heads, groups, length).transpose(-1, -2)
    v = vectors.float().reshape(*lead, kv_heads, groups, vectors.shape[-1])
    return w @ v


@dataclass(frozen=True)
class TargetRows:
    """The whole forward's query ``[U, H, d]`` and attention output ``[U, H, dv]`` at each
    target's (row, position): all the replays take of them, so the query and output of
    every position can go before the replays run (:meth:`AttentionCall.release_query_and_output`).
    """

    query: torch.Tensor
    output: torch.Tensor


def head_terms(
    call: AttentionCall,
    target_rows: TargetRows,
    g: torch.Tensor,
    *,
    dq: torch.Tensor | None,
    unique: UniqueTargets,
    checks: DeferredChecks,
) -> tuple[HeadTerms, HeadTerms, torch.Tensor]:
    """The key terms (score gradients w, queries q), value terms (probabilities a, g) and
    ``dz/dq`` ``[U, H, d]`` of every target, from ``g`` ``[U, H, dv]``: ``dz_t/do_t`` at the
    attention function's output of each target (``call``'s keys and values; its query and
    output at the targets: ``target_rows``); ``dq`` ``[U, H, d]``, where given, is the
    model's own backward's ``dz/dq`` at the targets, which the replays' must match.

    One replay with one target per batch element (its query row; its sequence's
    keys and values; its mask row), in chunks of bounded size, and one backward
    with cotangent ``g_t``. The head dimension
    gets ``G`` (query heads per key/value head) extra columns: one-hot by head
    within its group on the query and output-cotangent sides, zero on keys and
    values, so scores and outputs are unchanged while the extra columns of ``dk``
    and ``dv`` hold ``w`` and ``a`` of each query head separately (``dk`` and ``dv``
    themselves are :meth:`HeadTerms.summed`: dropped with each chunk, so what is kept
    grows with targets x T only as ``[U, H, T]``). The replayed
    outputs (and, with ``dq``, the recorded ``dz/dq`` of the summed targets) are
    checked through ``checks``.
    """
    batch, kv_heads, length = call.key.shape[:3]
    heads, dim = target_rows.query.shape[1:]
    dim_v = call.value.shape[-1]
    groups = heads // kv_heads
    count = unique.t.shape[0]
    device = call.key.device
    masks = _mask_rows(call, unique.rows, unique.t)
    one_hot = torch.eye(groups, device=device).repeat(kv_heads, 1)  # [H, G]: head h -> h % G
    per_target = length * kv_heads * (dim + dim_v + 2 * groups)
    per_chunk = max(1, _MAX_REPLAY_ELEMENTS // per_target)
    w, a, query_grads = [], [], []
    for start in range(0, count, per_chunk):
        rows = unique.rows[start : start + per_chunk]
        n = rows.shape[0]
        q = target_rows.query[start : start + per_chunk].float()  # [n, H, d]
        q_aug = torch.cat([q, one_hot.expand(n, -1, -1)], -1)[:, :, None].requires_grad_(True)
        zeros = q.new_zeros((n, kv_heads, length, groups))
        # one copy per target (the fp32 temporaries go at once: only the augmented ones stay)
        k_aug = torch.cat([call.key.detach()[rows].float(), zeros], -1).requires_grad_(True)
        v_aug = torch.cat([call.value.detach()[rows].float(), zeros], -1).requires_grad_(True)
        mask = None if masks is None else masks[start : start + per_chunk]
        with torch.enable_grad():
            try:
                out = call.replay(q_aug, k_aug, v_aug, mask)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise LastBlockRefused(f"replaying the attention function failed: {exc}") from exc
        if tuple(out.shape) != (n, 1, heads, dim_v + groups):
            raise LastBlockRefused(f"the replayed attention returned shape {tuple(out.shape)}")
        expected = target_rows.output[start : start + per_chunk].float()  # [n, H, dv]
        checks.close(
            out[:, 0],
            _pad(expected, groups),
            rows,
            "the attention output",
            batch=batch,
            dtype=call.compute_dtype,
        )
        g_chunk = g[start : start + per_chunk].float()
        cotangent = torch.cat([g_chunk, one_hot.expand(n, -1, -1)], -1)[:, None]
        dq_aug, dk_aug, dv_aug = torch.autograd.grad(out, (q_aug, k_aug, v_aug), cotangent)
        if dq is not None:
            recorded_dq = _pad(dq[start : start + per_chunk], groups)
            checks.close(
                dq_aug[:, :, 0], recorded_dq, rows, "dz/dq", batch=batch, dtype=call.compute_dtype
            )
        query_grads.append(dq_aug[:, :, 0, :dim])
        # extra column i of key/value head j: query head j * G + i
        w.append(dk_aug[..., dim:].permute(0, 1, 3, 2).reshape(n, heads, length))
        a.append(dv_aug[..., dim_v:].permute(0, 1, 3, 2).reshape(n, heads, length))
        del k_aug, v_aug, out, dk_aug, dv_aug  # before the next chunk's copies
    g_rows = g.float()  # [U, H, dv]
    return (
        HeadTerms(torch.cat(w), target_rows.query.float()),
        HeadTerms(torch.cat(a), g_rows),
        torch.cat(query_grads),
    )


def _pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([tensor.float(), tensor.new_zeros((*tensor.shape[:-1], columns)).float()], -1)
