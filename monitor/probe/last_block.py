"""The last attention block's Q, K, V and O gradient norms for every target in one pass.

For the target logit ``z_t`` of position t and an attention block after
which nothing mixes positions (:func:`last_block_refusal` says when that
holds), one forward and one backward of ``sum_t z_t`` give, for every t at
once, ``g_t = dz_t / do_t`` at the attention function's output (o_t reaches
only z_t). The rest comes from the model's own attention function
(:mod:`inversion_monitor.probe.attention_capture`), replayed with one target
per batch element: its query row, its sequence's keys and values (one copy
per batch row, expanded; cut after the last position its mask row lets
through), its mask row. One backward of the replay with cotangent ``g_t``
gives ``dz_t/dk_s = sum_h w_ts^h q_t^h`` and ``dz_t/dv_s = sum_h a_ts^h g_t^h``
per key/value head (the query heads h of its group add up; ``a`` are the
attention probabilities, ``w_ts = dz_t / d(q_t . k_s)``, masks, sliding
windows, soft-caps and sinks included, as the model computes them). With G
query heads per key/value head, G extra head-dimension columns separate the
heads at no change to scores or outputs: ``q' = [q_t, e_i(h)]``,
``k' = [k_s, 0]``, ``v' = [v_s, 0]`` and cotangent ``[g_t, e_i(h)]`` (i(h) the
head's index in its group) put ``w_ts^h`` and ``a_ts^h`` in the extra
columns of ``dk'`` and ``dv'``. The cost is that of attention for the
targets' rows, not T / d times it.

The summed terms are carried back through the per-position maps between the
projections and the attention (RoPE, q/k norms, layouts) by batched
vector-Jacobian products, targets of different batch rows sharing one
product where the map keeps rows apart (checked). Where that map is the
same linear map at every position (no RoPE: checked), the gradient has rank
<= H and its norm comes from H x H factors; otherwise from the Gram form,
the input side shared by the targets of a sequence and cut to each target's
support (:mod:`inversion_monitor.metrics.gram_norms`). Q and O are rank one
(``g_t x_t^T``); Q's ``g_t`` is the replays' ``dz/dq`` carried back to the
projection in one product, so the backward of ``sum_t z_t`` stops at the
attention output (the attention's own backward over every query is what
dominates at long T).

Every replay's output rows are checked against the recorded forward, and
its ``dz/dq`` against the model's own backward the first time an attention
module is probed (per implementation, dtype and device type); on any
mismatch :class:`LastBlockRefused` is raised and the caller uses the
general path: never a silently wrong value.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from inversion_monitor.metrics.gram_norms import input_factor, shared_input_norm
from inversion_monitor.metrics.norms import Norm, outer_sum_norm, rank_one_norm
from inversion_monitor.probe.architectures import ResolvedModel, positions_mix_after
from inversion_monitor.probe.attention_capture import (
    AttentionCall,
    attention_function,
    attention_module,
    recording_attention,
)

logger = logging.getLogger("inversion_monitor")

Component = tuple[int, str]
Site = tuple[nn.Module, torch.Tensor | None]

# layer types (``config.layer_types``) after which positions are not mixed
# by anything but the attention's own mask
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# fp32 elements of one batched cotangent ([packs, B, heads, T, d]): 512 Ki = 2 MiB. The
# map's backward makes several temporaries of that size: small enough to stay in cache
# (and be reused by the allocator; large blocks cost page faults on every touch). 4x this
# was ~15% slower for the whole probe at T = 256 and 2,048.
_MAX_COTANGENT_ELEMENTS = 1 << 19
# attention modules whose replayed backward matched their own (dz/dq), per
# (implementation, dtype, device type): later probes skip that full backward
_VERIFIED_BACKWARD: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, torch.dtype, str]]] = (
    weakref.WeakKeyDictionary()
)
# fp32 elements of one replay's key and value gradients ([targets, heads, span, 2d + 2G]): 8 MiB
_MAX_REPLAY_ELEMENTS = 1 << 21


class LastBlockRefused(RuntimeError):
    """The last-block path cannot compute these norms exactly; the reason is the message."""


@dataclass(frozen=True)
class ForwardOutput:
    """What the caller's forward returns: entropy and differentiable target logits per
    row, and the projection modules' captured inputs and outputs."""

    entropy: torch.Tensor
    target_logits: torch.Tensor
    inputs: Mapping[nn.Module, torch.Tensor]
    outputs: Mapping[nn.Module, torch.Tensor]


ForwardFn = Callable[
    [torch.Tensor, int, torch.Tensor, torch.Tensor], AbstractContextManager[ForwardOutput]
]
"""``forward(sequences, length, rows, t)``: a context manager that runs the model on
``input_ids[sequences, :length]`` and yields a :class:`ForwardOutput` with one entry
per target (``rows[k]``, ``t[k]``) of the forward batch."""


def positions_unmixed_after(resolved: ResolvedModel, layer: int) -> str | None:
    """None if nothing after block ``layer``'s attention mixes positions, else why not.

    The one-pass path additionally needs ``layer`` to be the last decoder block;
    what may mix positions is decided in one place,
    :func:`~inversion_monitor.probe.architectures.positions_mix_after`.
    """
    if layer != resolved.num_layers - 1:
        return f"block {layer} is not the last decoder block"
    return positions_mix_after(resolved, layer)


def last_block_refusal(
    resolved: ResolvedModel, layer: int, sites: Mapping[str, Site]
) -> str | None:
    """None if the one-pass path applies to block ``layer`` (checked again at run time)."""
    reason = positions_unmixed_after(resolved, layer)
    if reason is not None:
        return reason
    try:
        attention = attention_module(resolved.blocks[layer], next(iter(sites.values()))[0])
    except (LookupError, StopIteration) as exc:
        return str(exc)
    function = attention_function(attention)
    return function if isinstance(function, str) else None


@dataclass
class _Targets:
    """Unique targets: their rows in the forward batch, positions, and where they go."""

    rows: torch.Tensor  # [U] row of the forward batch
    t: torch.Tensor  # [U]
    inverse: torch.Tensor  # [N] index into the unique targets of each requested target


def last_block_norms(
    resolved: ResolvedModel,
    layer: int,
    sites: Mapping[str, Site],
    *,
    targets: torch.Tensor,
    norm: Norm,
    forward: ForwardFn,
) -> tuple[torch.Tensor, dict[Component, torch.Tensor]]:
    """Entropy ``[N]`` and ``{(layer, proj): [N]}`` for the ``[N, 2]`` ``targets``.

    ``sites`` maps the requested projections to their (module, columns).
    Duplicate targets are measured once. Raises :class:`LastBlockRefused`.
    """
    reason = last_block_refusal(resolved, layer, sites)
    if reason is not None:
        raise LastBlockRefused(reason)
    sequences, rows = torch.unique(targets[:, 0], return_inverse=True)
    length = int(targets[:, 1].max()) + 1
    keys = rows * length + targets[:, 1]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    unique = _Targets(rows=unique_keys // length, t=unique_keys % length, inverse=inverse)
    attention = attention_module(resolved.blocks[layer], next(iter(sites.values()))[0])
    with (
        recording_attention(attention) as recorder,
        forward(sequences, length, unique.rows, unique.t) as out,
    ):
        if len(recorder.calls) != 1:
            raise LastBlockRefused(
                f"the attention function ran {len(recorder.calls)} times in one forward"
            )
        values = _norms(recorder.calls[0], out, sites, unique, norm)
    entropy = out.entropy[unique.inverse]
    return entropy, {(layer, proj): v[unique.inverse] for proj, v in values.items()}


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


def _check_shapes(call: AttentionCall) -> None:
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
class _Piece:
    """``summed[index, :, :span]`` for some targets: ``values`` ``[n, Hkv, span, d]``."""

    index: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class _HeadTerms:
    """One projection's attention-side terms for every target.

    ``summed`` (``[U, Hkv, T, d]``, zero beyond each piece's span, kept as
    :class:`_Piece` s) is ``dz/dtensor`` from the replay's own backward (query
    heads of a group added up); per query head, ``summed[:, j, s] = sum_{h in
    group j} weights[:, h, s] * vectors[:, h]`` with ``weights`` ``[U, H, T]``,
    ``vectors`` ``[U, H, d]``.
    """

    weights: torch.Tensor
    vectors: torch.Tensor
    pieces: list[_Piece]


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


def _head_terms(
    call: AttentionCall, g: torch.Tensor, dq: torch.Tensor | None, unique: _Targets
) -> tuple[_HeadTerms, _HeadTerms, torch.Tensor]:
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
    key_pieces: list[_Piece] = []
    value_pieces: list[_Piece] = []
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
        key_pieces.append(_Piece(index, dk_aug[..., :dim]))
        value_pieces.append(_Piece(index, dv_aug[..., :dim_v]))
        # extra column i of key/value head j: query head j * G + i
        w[index, :, :span] = dk_aug[..., dim:].permute(0, 1, 3, 2).reshape(n, heads, span)
        a[index, :, :span] = dv_aug[..., dim_v:].permute(0, 1, 3, 2).reshape(n, heads, span)
    q_rows = call.query[unique.rows, :, unique.t].detach().float()  # [U, H, d]
    g_rows = g[unique.rows, unique.t].float()  # [U, H, dv]
    return _HeadTerms(w, q_rows, key_pieces), _HeadTerms(a, g_rows, value_pieces), query_grads


def _pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([tensor.float(), tensor.new_zeros((*tensor.shape[:-1], columns)).float()], -1)


def _slots(rows: torch.Tensor) -> torch.Tensor:
    """``[U]``: each target's rank among the targets of its batch row (its VJP slot)."""
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    first = torch.searchsorted(sorted_rows, sorted_rows)  # first index of each row's run
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(rows.numel(), device=rows.device) - first
    return rank


def _rows_independent(tensor: torch.Tensor, projection_output: torch.Tensor) -> bool:
    """Whether the map from ``projection_output`` to ``tensor`` keeps batch rows apart.

    Random cotangents on the rows whose index has bit k set (then clear) must give
    a gradient that is zero on the other rows, for every bit k: then no row reaches
    another (with probability one; exact zeros are what such maps produce).
    """
    batch = tensor.shape[0]
    if batch == 1:
        return True
    if projection_output.shape[0] != batch:
        return False
    index = torch.arange(batch, device=tensor.device)
    sides = []
    for bit in range(max(1, (batch - 1).bit_length())):
        on = (index >> bit) & 1 == 1
        sides += [on, ~on]
    generator = torch.Generator(device=tensor.device).manual_seed(0)
    noise = torch.randn(tensor.shape, generator=generator, device=tensor.device)
    chosen = torch.stack(sides)  # [tests, B]
    shape = (len(sides), batch) + (1,) * (tensor.ndim - 1)
    cotangent = (noise * chosen.reshape(shape).to(noise.dtype)).to(tensor.dtype)
    (grad,) = torch.autograd.grad(
        tensor, projection_output, cotangent, retain_graph=True, is_grads_batched=True
    )
    grad = grad.float()
    outside = grad[~chosen].abs().max() if bool((~chosen).any()) else grad.new_zeros(())
    inside = grad[chosen].abs().max()
    return bool(outside <= 1e-6 * inside)


@dataclass(frozen=True)
class _Carried:
    """Some targets' terms carried back to the projection: target ``targets[k]`` is
    ``source[index[k]]`` (``[T, width]``)."""

    source: torch.Tensor  # [packs * B, T, width]
    targets: torch.Tensor  # [n] positions in the requested order
    index: torch.Tensor  # [n]


def _to_projection(
    tensor: torch.Tensor,
    projection_output: torch.Tensor,
    terms: _HeadTerms,
    rows: torch.Tensor,
    *,
    rows_apart: bool,
    only: torch.Tensor | None = None,
) -> Iterator[_Carried]:
    """Each target's summed terms on ``tensor`` carried back to the projection (for the
    targets ``only``, if given; ``targets`` index into it), a chunk at a time.

    Batched vector-Jacobian products through the per-position maps (reshapes,
    RoPE, q/k norms). Targets of different batch rows share one product (each in
    its own row) where the map keeps rows apart (``rows_apart``, from
    :func:`_rows_independent`), so a product carries up to B targets.
    """
    count, batch = rows.shape[0], tensor.shape[0]
    chosen = torch.arange(count, device=rows.device) if only is None else only
    position = torch.full((count,), -1, dtype=torch.long, device=rows.device)
    position[chosen] = torch.arange(chosen.numel(), device=rows.device)
    if rows_apart:
        slots = torch.full_like(position, -1)
        slots[chosen] = _slots(rows[chosen])
    else:
        slots = position
    packs = int(slots.max()) + 1 if chosen.numel() else 0
    per_chunk = max(1, _MAX_COTANGENT_ELEMENTS // max(1, tensor.numel()))
    for start in range(0, packs, per_chunk):
        size = min(per_chunk, packs - start)
        full = tensor.new_zeros((size, *tensor.shape))
        for piece in terms.pieces:
            slot = slots[piece.index]
            keep = (slot >= start) & (slot < start + size)
            if bool(keep.any()):
                span = piece.values.shape[2]
                index = piece.index[keep]
                full[slot[keep] - start, rows[index], :, :span] = piece.values[keep].to(
                    tensor.dtype
                )
        (grad,) = torch.autograd.grad(
            tensor, projection_output, full, retain_graph=True, is_grads_batched=True
        )
        inside = ((slots >= start) & (slots < start + size)).nonzero().flatten()
        yield _Carried(
            grad.flatten(0, 1), position[inside], (slots[inside] - start) * batch + rows[inside]
        )


def _select(tensor: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    return tensor if columns is None else tensor.index_select(-1, columns.to(tensor.device))


def _grouped_norm(
    chunks: Iterator[_Carried],
    columns: torch.Tensor | None,
    inputs: torch.Tensor,
    unique: _Targets,
    norm: Norm,
) -> torch.Tensor:
    """Norm per target with the input side shared by the targets of each row."""
    values = torch.zeros(unique.rows.shape[0], dtype=torch.float32, device=unique.rows.device)
    factors: dict[int, torch.Tensor] = {}
    for chunk in chunks:
        rows, t = unique.rows[chunk.targets], unique.t[chunk.targets]
        # causal attention: positions after t do not reach z_t (checked, not assumed)
        source = _select(chunk.source, columns)
        reach = source.abs().amax(-1)[chunk.index]  # [n, T] (10x faster than an inf-norm)
        positions = torch.arange(reach.shape[1], device=reach.device)
        causal = not bool(reach[positions[None, :] > t[:, None]].any())
        for row in torch.unique(rows).tolist():
            index = (rows == row).nonzero().flatten()
            if row not in factors:
                factors[row] = input_factor(inputs[row], norm)
            values[chunk.targets[index]] = shared_input_norm(
                chunk.source,
                inputs[row],
                norm,
                support=t[index] + 1 if causal else None,
                rows=chunk.index[index],
                columns=columns,
                factor=factors[row],
            )
    return values


def _packed_vjp(
    tensor: torch.Tensor, projection_output: torch.Tensor, terms: _HeadTerms
) -> torch.Tensor:
    """``[U, H, width]``: each (target, head) vector carried back through the map from the
    projection to ``tensor``, assuming that map is the same at every position.

    The vectors are packed one per (batch row, position) slot, so a few vector-Jacobian
    products carry all of them; :func:`_factored_gamma` checks the assumption.
    """
    batch, kv_heads, length, _ = tensor.shape
    count, heads, _ = terms.weights.shape
    groups = heads // kv_heads
    total, slots = count * heads, batch * length
    vectors = terms.vectors.reshape(total, -1)
    head = torch.arange(total, device=vectors.device) % heads
    packs = -(-total // slots)
    cotangent = tensor.new_zeros((packs, *tensor.shape))
    slot = torch.arange(total, device=vectors.device)
    pack, within = slot // slots, slot % slots
    b, s = within // length, within % length
    cotangent[pack, b, head // groups, s] = vectors.to(tensor.dtype)
    (grad,) = torch.autograd.grad(
        tensor, projection_output, cotangent, retain_graph=True, is_grads_batched=True
    )
    return grad[pack, b, s].reshape(count, heads, -1)


def _same_map_everywhere(tensor: torch.Tensor, projection_output: torch.Tensor) -> bool:
    """Whether one random vector at every position and row of ``tensor`` comes back the
    same everywhere: necessary for :func:`_factored_gamma`'s premise, and one
    vector-Jacobian product instead of its full check (RoPE fails it at once)."""
    generator = torch.Generator(device=tensor.device).manual_seed(0)
    vector = torch.randn(tensor.shape[-1], generator=generator, device=tensor.device)
    cotangent = vector.to(tensor.dtype).expand(tensor.shape)
    (grad,) = torch.autograd.grad(tensor, projection_output, cotangent, retain_graph=True)
    grad = grad.float()  # [B, T, width]
    scale = float(grad.abs().max())
    return bool((grad - grad[:1, :1]).abs().max() <= 1e-4 * max(scale, 1e-30))


def _factored_gamma(
    tensor: torch.Tensor,
    projection_output: torch.Tensor,
    terms: _HeadTerms,
    rows: torch.Tensor,
    t: torch.Tensor,
    *,
    rows_apart: bool,
) -> torch.Tensor | None:
    """``[U, H, width]`` with ``Gamma_k = sum_h weights[k, h] (x) result[k, h]``, or None.

    Valid when the map from the projection output to ``tensor`` is the same
    linear map at every position (no RoPE, no norm): then each target's
    gradient has rank <= H. Checked exactly on the longest target of every
    batch row against the full vector-Jacobian product; None if it differs.
    """
    if projection_output.ndim != 3 or tuple(projection_output.shape[:2]) != (
        tensor.shape[0],
        tensor.shape[2],
    ):
        return None
    vectors = _packed_vjp(tensor, projection_output, terms).float()
    longest = torch.stack(
        [
            (rows == row).nonzero().flatten()[int(t[rows == row].argmax())]
            for row in torch.unique(rows).tolist()
        ]
    )
    full = torch.zeros((longest.numel(), *projection_output.shape[1:]), device=vectors.device)
    for chunk in _to_projection(
        tensor, projection_output, terms, rows, rows_apart=rows_apart, only=longest
    ):
        full[chunk.targets] = chunk.source[chunk.index].float()
    factored = torch.einsum("khs,khw->ksw", terms.weights[longest], vectors[longest])
    for got, expected in zip(factored, full, strict=True):
        scale = float(expected.norm())
        if not float((got - expected).norm()) <= 1e-4 * max(scale, 1e-12):
            return None
    return vectors


def _projection_norm(
    name: str,
    tensor: torch.Tensor,
    *,
    module: nn.Module,
    columns: torch.Tensor | None,
    out: ForwardOutput,
    terms: _HeadTerms,
    unique: _Targets,
    norm: Norm,
) -> torch.Tensor:
    """Norms of one projection (K or V) for every unique target."""
    projection_output, inputs = out.outputs[module], out.inputs[module]
    batch = tensor.shape[0]
    rows_apart = functools.cache(
        lambda: batch == 1 or _rows_independent(tensor, projection_output)
    )  # tested once, where needed
    vectors = None
    if _same_map_everywhere(tensor, projection_output):  # else no factored form (RoPE)
        # the check carries one target per row: testing that rows stay apart
        # (2 log2 B products) pays off for many rows only
        few_rows = batch <= 2 * max(1, (batch - 1).bit_length()) + 1
        vectors = _factored_gamma(
            tensor,
            projection_output,
            terms,
            unique.rows,
            unique.t,
            rows_apart=batch == 1 or (not few_rows and rows_apart()),
        )
    route = "rank <= H factors" if vectors is not None else "shared-input Gram"
    logger.debug("last block %s: %s", name, route)
    if vectors is not None:  # rank <= H: sum_h (vector_h)(sum_s weight_hs x_s)^T
        mixed = inputs.new_empty((*terms.weights.shape[:2], inputs.shape[-1]), dtype=torch.float32)
        for row in torch.unique(unique.rows).tolist():
            index = (unique.rows == row).nonzero().flatten()
            mixed[index] = terms.weights[index] @ inputs[row].float()
        return outer_sum_norm(_select(vectors, columns), mixed, norm)
    chunks = _to_projection(tensor, projection_output, terms, unique.rows, rows_apart=rows_apart())
    return _grouped_norm(chunks, columns, inputs, unique, norm)


def _backward_key(call: AttentionCall) -> tuple[str, torch.dtype, str]:
    return (call.implementation, call.query.dtype, call.query.device.type)


def _query_gradient(
    call: AttentionCall,
    projection_output: torch.Tensor,
    query_grads: torch.Tensor,
    unique: _Targets,
) -> torch.Tensor:
    """``[U, width]``: ``dz_t / dy_t`` at the query projection's output for every target, from
    the replays' ``dz/dq`` carried back through the map to the query (RoPE, q norm) in one
    vector-Jacobian product (targets are unique (row, t) pairs, so they do not collide)."""
    cotangent = torch.zeros_like(call.query)
    cotangent[unique.rows, :, unique.t] = query_grads.to(call.query.dtype)
    (grad,) = torch.autograd.grad(call.query, projection_output, cotangent, retain_graph=True)
    return grad[unique.rows, unique.t]


def _norms(
    call: AttentionCall,
    out: ForwardOutput,
    sites: Mapping[str, Site],
    unique: _Targets,
    norm: Norm,
) -> dict[str, torch.Tensor]:
    _check_shapes(call)
    wanted: Sequence[str] = list(sites)
    rows, t = unique.rows, unique.t
    # The attention function computed from detached q, k, v (call.leaves): this backward
    # stops there, so the attention's own backward over every query (what dominates at
    # long T) is not run; the replays give dz/dq, checked against that backward once per
    # module, implementation and dtype. It also gives what reaches each projection's
    # output by any other path (a gate on the attention output from the query projection).
    verify = _backward_key(call) not in _VERIFIED_BACKWARD.get(call.module, set())
    tensors = [call.output, *([call.leaves[0]] if verify else [])]
    tensors += [out.outputs[sites[proj][0]] for proj in wanted]
    grads = torch.autograd.grad(
        out.target_logits.sum(), tensors, retain_graph=True, allow_unused=True
    )
    g, dq = grads[0], grads[1] if verify else None
    if g is None or (verify and dq is None):
        raise LastBlockRefused("the target logits do not depend on the attention output")
    around = dict(zip(wanted, grads[-len(wanted) :], strict=True))  # paths around attention
    for proj in ("k", "v"):
        other = around.get(proj)
        if other is not None and bool(_select(other, sites[proj][1]).any()):
            raise LastBlockRefused(
                f"the {proj} projection's output reaches the logits other than through the "
                "attention's keys and values"
            )
    key_terms, value_terms, query_grads = _head_terms(call, g, dq, unique)
    if verify:
        _VERIFIED_BACKWARD.setdefault(call.module, set()).add(_backward_key(call))
    values: dict[str, torch.Tensor] = {}
    for proj in ("q", "o"):  # y_t reaches only z_t: G = g_t x_t^T
        if proj in wanted:
            module, columns = sites[proj]
            grad = around[proj]
            if proj == "q":  # through the attention (the replays' dz/dq), plus any other path
                through = _query_gradient(call, out.outputs[module], query_grads, unique)
                grad = through if grad is None else through + grad[rows, t]
            elif grad is None:
                raise LastBlockRefused("the o projection's output does not reach the logits")
            else:
                grad = grad[rows, t]
            values[proj] = rank_one_norm(_select(grad, columns), out.inputs[module][rows, t], norm)
    for proj, tensor, terms in (("k", call.key, key_terms), ("v", call.value, value_terms)):
        if proj in wanted:
            module, columns = sites[proj]
            values[proj] = _projection_norm(
                proj,
                tensor,
                module=module,
                columns=columns,
                out=out,
                terms=terms,
                unique=unique,
                norm=norm,
            )
    return {proj: values[proj] for proj in wanted}
