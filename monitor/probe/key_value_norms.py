"""K and V of the last block: each target's attention-side terms carried back to the projection.

The terms :func:`~inversion_monitor.probe.attention_replay.head_terms` found
at the attention's keys or values are carried back through the per-position
maps between the projection and the attention (RoPE, k norms, layouts) by
batched vector-Jacobian products, targets of different batch rows sharing one
product where the map keeps rows apart (:func:`rows_independent`, checked).
Where that map is the same linear map at every position (no RoPE: checked),
the gradient has rank <= H and its norm comes from H x H factors; otherwise
from the Gram form, the input side shared by the targets of a sequence and
cut to each target's support (:mod:`inversion_monitor.metrics.gram_norms`).
:func:`projection_norm` chooses.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from inversion_monitor.metrics.gram_norms import input_factor, shared_input_norm
from inversion_monitor.metrics.norms import Norm, outer_sum_norm
from inversion_monitor.probe.architectures import select_columns
from inversion_monitor.probe.attention_replay import HeadTerms, UniqueTargets
from inversion_monitor.probe.forward import ForwardPass

logger = logging.getLogger("inversion_monitor")

# fp32 elements of one batched cotangent ([packs, B, heads, T, d]): 512 Ki = 2 MiB. The
# map's backward makes several temporaries of that size: small enough to stay in cache
# (and be reused by the allocator; large blocks cost page faults on every touch). 4x this
# was ~15% slower for the whole probe at T = 256 and 2,048.
_MAX_COTANGENT_ELEMENTS = 1 << 19


def slot_ranks(rows: torch.Tensor) -> torch.Tensor:
    """``[U]``: each target's rank among the targets of its batch row (its VJP slot)."""
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    first = torch.searchsorted(sorted_rows, sorted_rows)  # first index of each row's run
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(rows.numel(), device=rows.device) - first
    return rank


def rows_independent(tensor: torch.Tensor, projection_output: torch.Tensor) -> bool:
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
class ProjectionGradients:
    """Some targets' terms carried back to the projection: target ``targets[k]`` is
    ``source[index[k]]`` (``[T, width]``)."""

    source: torch.Tensor  # [packs * B, T, width]
    targets: torch.Tensor  # [n] positions in the requested order
    index: torch.Tensor  # [n]


def _to_projection(
    tensor: torch.Tensor,
    projection_output: torch.Tensor,
    terms: HeadTerms,
    rows: torch.Tensor,
    *,
    rows_apart: bool,
    only: torch.Tensor | None = None,
) -> Iterator[ProjectionGradients]:
    """Each target's summed terms on ``tensor`` carried back to the projection (for the
    targets ``only``, if given; ``targets`` index into it), a chunk at a time.

    Batched vector-Jacobian products through the per-position maps (reshapes,
    RoPE, q/k norms). Targets of different batch rows share one product (each in
    its own row) where the map keeps rows apart (``rows_apart``, from
    :func:`rows_independent`), so a product carries up to B targets.
    """
    count, batch = rows.shape[0], tensor.shape[0]
    chosen = torch.arange(count, device=rows.device) if only is None else only
    position = torch.full((count,), -1, dtype=torch.long, device=rows.device)
    position[chosen] = torch.arange(chosen.numel(), device=rows.device)
    if rows_apart:
        slots = torch.full_like(position, -1)
        slots[chosen] = slot_ranks(rows[chosen])
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
        yield ProjectionGradients(
            grad.flatten(0, 1), position[inside], (slots[inside] - start) * batch + rows[inside]
        )


def _grouped_norm(
    chunks: Iterator[ProjectionGradients],
    columns: torch.Tensor | None,
    inputs: torch.Tensor,
    unique: UniqueTargets,
    norm: Norm,
) -> torch.Tensor:
    """Norm per target with the input side shared by the targets of each row."""
    values = torch.zeros(unique.rows.shape[0], dtype=torch.float32, device=unique.rows.device)
    factors: dict[int, torch.Tensor] = {}
    for chunk in chunks:
        rows, t = unique.rows[chunk.targets], unique.t[chunk.targets]
        # causal attention: positions after t do not reach z_t (checked, not assumed)
        source = select_columns(chunk.source, columns)
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
    tensor: torch.Tensor, projection_output: torch.Tensor, terms: HeadTerms
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
    terms: HeadTerms,
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


def projection_norm(
    name: str,
    tensor: torch.Tensor,
    *,
    module: nn.Module,
    columns: torch.Tensor | None,
    out: ForwardPass,
    terms: HeadTerms,
    unique: UniqueTargets,
    norm: Norm,
) -> torch.Tensor:
    """Norms of one projection (K or V) for every unique target."""
    projection_output, inputs = out.outputs[module], out.inputs[module]
    batch = tensor.shape[0]
    rows_apart = functools.cache(
        lambda: batch == 1 or rows_independent(tensor, projection_output)
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
        return outer_sum_norm(select_columns(vectors, columns), mixed, norm)
    chunks = _to_projection(tensor, projection_output, terms, unique.rows, rows_apart=rows_apart())
    return _grouped_norm(chunks, columns, inputs, unique, norm)
