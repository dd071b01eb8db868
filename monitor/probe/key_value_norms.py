"""K and V of the last block: each target's attention-side terms carried back to the projection.

The terms :func:`~inversion_monitor.probe.attention_replay.head_terms` found
at the attention's keys or values are carried back through the per-position
maps between the projection and the attention (RoPE, k norms, layouts) by
batched vector-Jacobian products, targets of different batch rows sharing one
product where the map keeps rows apart (:func:`rows_independent`, checked).
Where that map is the same linear map at every position (no RoPE: checked),
the gradient has rank <= H and its norm comes from H x H factors; otherwise
from the Gram form, the input side shared by the targets of a sequence and
batched over every target at once: ``||G_k|| = ||R_b Gamma_k||`` with ``R_b`` from
one QR of each row's inputs (``X_b^T = Q R_b``) and ``Gamma_k`` the target's output
gradients (zero after t), and one batched eigensolve of the ``[U, a, a]`` Gram
matrices. :class:`KeyValueRoute` takes the route decisions for both projections
on the device; they are read back with the replay's checks in one transfer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inversion_monitor.metrics.gram_nuclear import gram_nuclear_norm
from inversion_monitor.metrics.lapack import qr_factor
from inversion_monitor.metrics.norms import Norm, outer_sum_norm
from inversion_monitor.probe.architectures import select_columns
from inversion_monitor.probe.attention_replay import (
    DeferredChecks,
    HeadTerms,
    UniqueTargets,
    grouped_sum,
)

logger = logging.getLogger("inversion_monitor")

# elements of one batched cotangent ([slots, B, heads, T, d]): 40 Mi, under the 48M-element
# bound on any intermediate (the slots' gradients and R Gamma products are no larger). Few
# chunks (77 slots, Qwen2-0.5B's shape at 256 targets, are one), so the count of ops stays flat
_MAX_COTANGENT_ELEMENTS = 40 << 20
# bytes of float64 Gram matrices one batched solve takes (nuclear_norms_together): 64 MiB,
# so K's and V's of the bench shapes go to one solve, and a [64, 1024, 1024] stack (d 4096,
# 8 key-value heads) to eight, not one holding ~5 GiB of iterates
_MAX_SOLVE_BYTES = 1 << 26
# elements of one fp32 block of a projection's inputs ([B, block, d], input_product): 8 Mi,
# so no [B, d, T] fp32 copy of them is held (134M elements at d 4096, T 8192, B 4)
_MAX_INPUT_BLOCK_ELEMENTS = 8 << 20


def slot_ranks(rows: torch.Tensor) -> torch.Tensor:
    """``[U]``: each target's rank among the targets of its batch row (its VJP slot).

    >>> slot_ranks(torch.tensor([2, 0, 2, 1, 0, 2])).tolist()
    [0, 0, 1, 0, 1, 2]
    """
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    first = torch.searchsorted(sorted_rows, sorted_rows)  # first index of each row's run
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(rows.numel(), device=rows.device) - first
    return rank


def rows_independent_flag(tensor: torch.Tensor, projection_output: torch.Tensor) -> torch.Tensor:
    """Whether the map from ``projection_output`` to ``tensor`` keeps batch rows apart,
    as a 0-dim bool tensor (no host sync).

    Random cotangents on the rows whose index has bit k set (then clear) must give
    a gradient that is zero on the other rows, for every bit k: then no row reaches
    another (with probability one; exact zeros are what such maps produce).
    """
    batch = tensor.shape[0]
    if batch == 1:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    if projection_output.shape[0] != batch:
        return torch.zeros((), dtype=torch.bool, device=tensor.device)
    index = torch.arange(batch, device=tensor.device)
    sides = []
    for bit in range(max(1, (batch - 1).bit_length())):
        on = (index >> bit) & 1 == 1
        sides += [on, ~on]
    generator = torch.Generator(device=tensor.device).manual_seed(0)
    noise = torch.randn(tensor.shape, generator=generator, device=tensor.device)
    noise = noise.to(tensor.dtype)  # the [tests, ...] tensors below in the tensor's dtype
    chosen = torch.stack(sides)  # [tests, B]
    # the tests in chunks of cotangents under the cap (one chunk at the bench shapes): the
    # same noise and tests, so the same decision, and no more host syncs (none)
    per_chunk = _slots_per_chunk(tensor)
    sizes = []
    for start in range(0, len(sides), per_chunk):
        part = chosen[start : start + per_chunk]
        shape = (part.shape[0], batch) + (1,) * (tensor.ndim - 1)
        cotangent = noise * part.reshape(shape).to(noise.dtype)
        (grad,) = torch.autograd.grad(
            tensor, projection_output, cotangent, retain_graph=True, is_grads_batched=True
        )
        del cotangent
        # [tests, B]: the largest entry of each, without an [tests, B, T, width] copy
        sizes.append(torch.linalg.vector_norm(grad.flatten(2), ord=float("inf"), dim=-1))
        del grad
    del noise
    size = (sizes[0] if len(sizes) == 1 else torch.cat(sizes)).float()
    outside = torch.where(chosen, torch.zeros_like(size), size).amax()
    inside = torch.where(chosen, size, torch.zeros_like(size)).amax()
    return outside <= 1e-6 * inside


def rows_independent(tensor: torch.Tensor, projection_output: torch.Tensor) -> bool:
    """:func:`rows_independent_flag`, read back."""
    return bool(rows_independent_flag(tensor, projection_output))


def _same_map_flag(tensor: torch.Tensor, projection_output: torch.Tensor) -> torch.Tensor:
    """Whether one random vector at every position and row of ``tensor`` comes back the
    same everywhere (0-dim bool): necessary for the factored route's premise, and one
    vector-Jacobian product instead of its full check (RoPE fails it at once)."""
    generator = torch.Generator(device=tensor.device).manual_seed(0)
    vector = torch.randn(tensor.shape[-1], generator=generator, device=tensor.device)
    cotangent = vector.to(tensor.dtype).expand(tensor.shape)
    (grad,) = torch.autograd.grad(tensor, projection_output, cotangent, retain_graph=True)
    grad = grad.float()  # [B, T, width]
    scale = grad.abs().amax().clamp_min(1e-30)
    return (grad - grad[:1, :1]).abs().amax() <= 1e-4 * scale


def _carried(
    tensor: torch.Tensor,
    projection_output: torch.Tensor,
    terms: HeadTerms,
    *,
    rows: torch.Tensor,
    slots: torch.Tensor,
    packs: int,
) -> Iterator[torch.Tensor]:
    """Targets' summed terms (:meth:`HeadTerms.summed`, target k in batch row ``rows[k]``)
    carried back to the projection output: ``[p, B, T, width]`` per chunk of cotangent
    slots, target k in slot ``slots[k]`` (distinct within a row; ``packs`` slots).

    Each chunk's cotangent ``[p, B, Hkv, T, d]`` is built from the weights and vectors
    placed at their (slot, row), so no ``[targets, Hkv, T, d]`` tensor is ever formed.
    """
    per_chunk = _slots_per_chunk(tensor)
    batch, kv_heads = tensor.shape[0], tensor.shape[1]
    for start in range(0, packs, per_chunk):
        size = min(per_chunk, packs - start)
        # targets of other chunks land in a slot that is dropped
        local = slots - start
        local = torch.where((local >= 0) & (local < size), local, size)
        weights = terms.weights.new_zeros((size + 1, batch, *terms.weights.shape[1:]))
        vectors = terms.vectors.new_zeros((size + 1, batch, *terms.vectors.shape[1:]))
        weights[local, rows] = terms.weights
        vectors[local, rows] = terms.vectors
        cotangent = grouped_sum(weights[:size], vectors[:size], kv_heads).to(tensor.dtype)
        del weights, vectors
        (grad,) = torch.autograd.grad(
            tensor, projection_output, cotangent, retain_graph=True, is_grads_batched=True
        )
        yield grad


def _packed_vjp(
    tensor: torch.Tensor, projection_output: torch.Tensor, terms: HeadTerms
) -> torch.Tensor:
    """``[U, H, width]``: each (target, head) vector carried back through the map from the
    projection to ``tensor``, assuming that map is the same at every position.

    The vectors are packed one per (batch row, position) slot, so a few vector-Jacobian
    products carry all of them; :meth:`KeyValueRoute.decide` checks the assumption.
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


def _longest_per_row(unique: UniqueTargets, batch: int) -> torch.Tensor:
    """``[B]``: the index of each batch row's target with the largest t (every row of the
    forward batch holds a target)."""
    count = unique.t.shape[0]
    key = unique.t * count + torch.arange(count, device=unique.t.device)
    best = torch.full((batch,), -1, dtype=key.dtype, device=key.device)
    best = best.scatter_reduce(0, unique.rows, key, "amax")
    return best.clamp_min(0) % count


@dataclass(frozen=True)
class PendingGrams:
    """A projection's nuclear norms still to be solved: its Gram matrices ``[N, n, n]``
    (solved with the other projection's, :func:`nuclear_norms_together`) and where each
    target's norm lies among theirs: ``pick`` the targets' (slot, row) when the matrices
    are every (slot, row)'s ``[packs * B]``, None when they are the targets' own, in order.

    >>> grams = PendingGrams(torch.zeros(4, 2, 2), (torch.tensor([1, 0]), torch.tensor([0, 1])), 2)
    >>> grams.norms(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
    [3.0, 2.0]
    """

    matrices: torch.Tensor
    pick: tuple[torch.Tensor, torch.Tensor] | None
    batch: int

    def norms(self, solved: torch.Tensor) -> torch.Tensor:
        """``[U]``: each target's norm from the matrices' norms ``solved`` ``[N]``."""
        if self.pick is None:
            return solved
        slots, rows = self.pick
        return solved.view(-1, self.batch)[slots, rows]


@dataclass
class KeyValueRoute:
    """The route of one projection (K or V): factored (rank <= H) or shared-input Gram.

    :meth:`decide` queues the decisions on the device (the factored form's premise,
    checked exactly on each row's longest target; whether the map keeps rows
    apart); :meth:`norms` computes the values once they are read back.
    """

    name: str
    tensor: torch.Tensor
    projection_output: torch.Tensor
    inputs: torch.Tensor
    columns: torch.Tensor | None
    terms: HeadTerms
    vectors: torch.Tensor | None = None

    def decide(
        self,
        unique: UniqueTargets,
        checks: DeferredChecks,
        known: Mapping[str, bool] | None = None,
    ) -> None:
        """Queue this projection's route decisions (flags ``{name} factored``, ``{name}
        rows apart``) on ``checks``; those in ``known`` (by ``"factored"``, ``"rows
        apart"``: decided on an earlier probe of the same projection) are not checked."""
        known = {} if known is None else known
        tensor, output = self.tensor, self.projection_output
        if "rows apart" not in known:
            checks.flag(f"{self.name} rows apart", rows_independent_flag(tensor, output))
        decided = known.get("factored")
        if decided is False:
            return
        if output.ndim != 3 or tuple(output.shape[:2]) != (tensor.shape[0], tensor.shape[2]):
            return
        self.vectors = _packed_vjp(tensor, output, self.terms).float()
        if decided:
            return
        same_map = _same_map_flag(tensor, output)
        # the premise checked exactly on the longest target of every row, one slot for
        # all rows (a map that mixes rows fails it: the Gram route then runs)
        batch = tensor.shape[0]
        longest = _longest_per_row(unique, batch)
        rows = torch.arange(batch, device=longest.device)
        (full,) = _carried(
            tensor,
            output,
            HeadTerms(self.terms.weights[longest], self.terms.vectors[longest]),
            rows=rows,
            slots=torch.zeros_like(rows),
            packs=1,
        )
        full = full[0].float()  # [B, T, width]
        factored = torch.einsum("khs,khw->ksw", self.terms.weights[longest], self.vectors[longest])
        error = (factored - full).flatten(1).norm(dim=1)
        scale = full.flatten(1).norm(dim=1).clamp_min(1e-12)
        checks.flag(f"{self.name} factored", same_map & (error <= 1e-4 * scale).all())

    def norms(
        self,
        unique: UniqueTargets,
        flags: dict[str, bool],
        norm: Norm,
        factors: dict[tuple[int, ...], torch.Tensor],
    ) -> torch.Tensor | PendingGrams:
        """``[U]`` norms by the route ``flags`` chose; ``factors`` caches each input
        tensor's factor (K and V usually share one). Nuclear norms of the Gram route come
        back as :class:`PendingGrams` (K's and V's are solved together by
        :func:`nuclear_norms_together`)."""
        factored = flags.get(f"{self.name} factored", False)
        logger.debug(
            "last block %s: %s", self.name, "rank <= H factors" if factored else "shared-input Gram"
        )
        if factored:
            assert self.vectors is not None
            return self._factored(unique, norm, factors)
        values, solved, pick = self._gram(unique, norm, flags[f"{self.name} rows apart"], factors)
        if norm != "nuclear":
            return values
        pending = PendingGrams(values, pick, self.tensor.shape[0])
        # past the solve cap alone: solved batch by batch as the matrices came
        return pending.norms(values) if solved else pending

    def _by_row(self, values: torch.Tensor, unique: UniqueTargets) -> torch.Tensor:
        """``values`` ``[U, ...]`` placed at (slot, row): ``[packs, B, ...]``, zero elsewhere."""
        batch = self.tensor.shape[0]
        out = values.new_zeros((unique.packs, batch, *values.shape[1:]))
        out[unique.slots, unique.rows] = values
        return out

    def _factored(
        self, unique: UniqueTargets, norm: Norm, factors: dict[tuple[int, ...], torch.Tensor]
    ) -> torch.Tensor:
        """rank <= H: ``G = sum_h (vector_h)(sum_s weight_hs x_s)^T`` (the inputs taken to
        fp32 in blocks of positions, :func:`input_product`)."""
        assert self.vectors is not None
        weights = self._by_row(self.terms.weights, unique)  # [P, B, H, T]
        packs, batch, heads, length = weights.shape
        # one [B, P * H, T] @ [B, T, b] product (as X_b^T-side blocks, input_product):
        # broadcasting the inputs over the slots would copy them P times ([P, B, T, b])
        rows_first = weights.permute(1, 0, 2, 3).reshape(batch, packs * heads, length)
        del weights
        mixed = input_product(self.inputs, rows_first.transpose(1, 2)).transpose(1, 2)
        mixed = mixed.reshape(batch, packs, heads, -1)
        mixed = mixed[unique.rows, unique.slots]  # [U, H, b]
        return outer_sum_norm(select_columns(self.vectors, self.columns), mixed, norm)

    def _gram(
        self,
        unique: UniqueTargets,
        norm: Norm,
        rows_apart: bool,
        factors: dict[tuple[int, ...], torch.Tensor],
    ) -> tuple[torch.Tensor, bool, tuple[torch.Tensor, torch.Tensor] | None]:
        """``||R_b Gamma_k||`` for every target ``[U]``; nuclear: the Gram matrices
        ``[U, n, n]`` instead, one per target in order (only the targets' (slot, row)
        matrices are solved). Where the matrices of every (slot, row) pass
        :data:`_MAX_SOLVE_BYTES` they are solved in batches of that size as the chunks make
        them (:class:`_StreamedSolve`), and their norms ``[packs * B]`` come back instead,
        with ``True`` and the targets' (slot, row) to pick (:attr:`PendingGrams.pick`)."""
        count = unique.t.shape[0]
        batch = self.inputs.shape[0]
        if rows_apart:  # targets of different rows share a product
            slots, packs = unique.slots, unique.packs
        else:
            slots, packs = torch.arange(count, device=unique.t.device), count
        width = self.projection_output.shape[-1]
        if self.columns is not None:
            width = self.columns.numel()
        key = input_key(self.inputs)
        if key not in factors:
            gram_work = 4 * packs * width * width if norm == "nuclear" else 0
            factors[key] = batched_input_factor(
                self.inputs, norm, columns=packs * width, gram_work=gram_work
            )
        factor = factors[key]  # [B, r, T], or empty: X_b^T itself (input_product)
        per_chunk = _slots_per_chunk(self.tensor)
        stream = None
        if norm == "nuclear":
            rank = factor.shape[1] if factor.numel() else self.inputs.shape[-1]
            size = min(rank, width)
            held = packs * batch if rows_apart else count
            if held * size * size * 8 > _MAX_SOLVE_BYTES:
                stream = _StreamedSolve(held, size, self.inputs.device)
        parts = []
        for start, grad in zip(
            range(0, packs, per_chunk),
            _carried(
                self.tensor,
                self.projection_output,
                self.terms,
                rows=unique.rows,
                slots=slots,
                packs=packs,
            ),
            strict=True,
        ):
            gamma = select_columns(grad, self.columns).float()  # [p, B, T, a]
            del grad
            # [p, B, r, a]: R_b Gamma (zero rows after t); the slots go into the columns of
            # one product, as broadcasting factor[None] would copy it p times ([p, B, r, T])
            p, _, length, a = gamma.shape
            columns = gamma.permute(1, 2, 0, 3).reshape(batch, length, p * a)
            del gamma
            # R_b Gamma, or X_b^T Gamma in blocks of positions where R would not be smaller
            product = factor @ columns if factor.numel() else input_product(self.inputs, columns)
            del columns
            product = product.reshape(batch, -1, p, a)  # [B, r, p, a], a view
            if norm != "nuclear":  # [p, B] from the view, no [p, B, r, a] copy
                order = 1 if norm == "l1" else 2
                parts.append(torch.linalg.vector_norm(product, order, dim=(1, 3)).T)
                continue
            product = product.permute(2, 0, 1, 3)  # [p, B, r, a], a view
            if not rows_apart:  # slot i of this chunk is target start + i, in its own row
                product = product[torch.arange(p, device=product.device), unique.rows[start:][:p]]
            elif stream is None and p == packs:  # one chunk: only the targets' matrices
                product = product[slots, unique.rows]
            # else every (slot, row)'s matrices, in that order, from the [p, B, r, a] view
            part = _small_gram(product, stream)
            del product
            if stream is None:
                parts.append(part)
        if stream is not None:  # every (slot, row)'s norms, or every target's in order
            return stream.norms(), True, (slots, unique.rows) if rows_apart else None
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        if norm != "nuclear":
            return values[slots, unique.rows], False, None
        if rows_apart and len(parts) > 1:  # several chunks: solve only the targets' matrices
            values = values.view(-1, batch, *values.shape[1:])[slots, unique.rows]
        return values, False, None


def _slots_per_chunk(tensor: torch.Tensor) -> int:
    """Cotangent slots per vector-Jacobian product of ``tensor`` (:func:`_carried`)."""
    return max(1, _MAX_COTANGENT_ELEMENTS // max(1, tensor.numel()))


def input_key(inputs: torch.Tensor) -> tuple[int, ...]:
    """What identifies a projection's input tensor: its storage and layout (K's and V's
    captured inputs are different tensor objects on one storage; they share one factor)."""
    return (inputs.data_ptr(), *inputs.shape, *inputs.stride(), inputs.dtype.itemsize)


def nuclear_norms_together(grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The nuclear norms of several projections' Gram matrices (``[N, n, n]`` each) in one
    batched solve: smaller ones are padded with zero rows and columns (a zero eigenvalue
    adds nothing). Past :data:`_MAX_SOLVE_BYTES` of matrices in all, each projection's are
    solved in batches of that size instead (no padded copy; the matmul route holds about
    five copies of what it solves at once)."""
    if not grams:
        return {}
    size = max(gram.shape[-1] for gram in grams.values())
    each = size * size * 8
    if sum(gram.shape[0] for gram in grams.values()) * each > _MAX_SOLVE_BYTES:
        per_batch = max(1, _MAX_SOLVE_BYTES // each)
        return {
            name: torch.cat(
                [
                    gram_nuclear_norm(gram[start : start + per_batch])
                    for start in range(0, gram.shape[0], per_batch)
                ]
            )
            for name, gram in grams.items()
        }
    padded = [
        gram if gram.shape[-1] == size else F.pad(gram, (0, size - gram.shape[-1]) * 2)
        for gram in grams.values()
    ]
    norms = gram_nuclear_norm(padded[0] if len(padded) == 1 else torch.cat(padded))
    counts = [gram.shape[0] for gram in grams.values()]
    return dict(zip(grams, torch.split(norms, counts), strict=True))


def _small_gram(product: torch.Tensor, sink: _StreamedSolve | None = None) -> torch.Tensor:
    """``A^T A`` or ``A A^T``, whichever is smaller, in float64, of each matrix ``A`` of
    ``product`` (``[N, p, q]``, or ``[N, M, p, q]``: ``N * M`` matrices in that order, from a
    view that need not be flattenable): taken to float64 in groups of
    :data:`_MAX_SOLVE_BYTES` along the first dimension, so neither a float64 nor a flattened
    copy of ``product`` is held. With ``sink``, each group's matrices go to it as they are
    made (only one group is held) and an empty tensor is returned.

    >>> _small_gram(torch.tensor([[[1.0, 2.0, 2.0]]])).tolist()
    [[[9.0]]]
    """
    *lead, rows, cols = product.shape
    size = min(rows, cols)
    inner = math.prod(lead[1:])
    out = product.new_empty((0 if sink else math.prod(lead), size, size), dtype=torch.float64)
    step = max(1, _MAX_SOLVE_BYTES // (inner * rows * cols * 8))
    for start in range(0, lead[0], step):
        a = product[start : start + step].double()
        if a.ndim == 4:  # [n, M, p, q]: contiguous now, so a view
            a = a.flatten(0, 1)
        # bmm, not matmul: the same product without matmul's expand/view ops per group
        left, right = (a, a.mT) if rows < cols else (a.mT, a)
        if sink is None:
            torch.bmm(left, right, out=out[start * inner : start * inner + a.shape[0]])
        else:
            sink.add(torch.bmm(left, right))
        del a, left, right  # before the next group's float64 copy
    return out


class _StreamedSolve:
    """Nuclear norms of ``count`` float64 ``[size, size]`` Gram matrices added in pieces,
    solved in batches of :data:`_MAX_SOLVE_BYTES` as they fill (the batches
    :func:`nuclear_norms_together` would make), so no more than one batch is held.

    >>> solve = _StreamedSolve(3, 2, torch.device("cpu"))
    >>> solve.add(torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    >>> solve.norms().tolist()
    [2.0, 2.0, 2.0]
    """

    def __init__(self, count: int, size: int, device: torch.device) -> None:
        self.count = count
        self.batch = min(count, max(1, _MAX_SOLVE_BYTES // (size * size * 8)))
        self.buffer = torch.zeros((self.batch, size, size), dtype=torch.float64, device=device)
        self.filled = 0
        self.solved: list[torch.Tensor] = []

    def add(self, grams: torch.Tensor) -> None:
        """Append ``[n, size, size]`` matrices; solve each batch once it is full."""
        while grams.shape[0]:
            take = min(grams.shape[0], self.batch - self.filled)
            self.buffer[self.filled : self.filled + take] = grams[:take]
            self.filled += take
            grams = grams[take:]
            if self.filled == self.batch:
                self._solve()

    def _solve(self) -> None:
        if self.filled:
            self.solved.append(gram_nuclear_norm(self.buffer[: self.filled]))
            self.filled = 0

    def norms(self) -> torch.Tensor:
        """``[count]``: every matrix's nuclear norm, in the order added."""
        self._solve()
        norms = self.solved[0] if len(self.solved) == 1 else torch.cat(self.solved)
        return norms[: self.count]


def input_product(inputs: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``X_b^T @ right_b`` in fp32 (``inputs`` ``[B, T, d]`` in any dtype, ``right``
    ``[B, T, n]``): ``[B, d, n]``, the inputs taken to fp32 in blocks of positions of
    :data:`_MAX_INPUT_BLOCK_ELEMENTS` (one block at the bench shapes), not all at once.

    >>> x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    >>> torch.allclose(input_product(x, y), x.transpose(1, 2) @ y, atol=1e-6)
    True
    """
    batch, length, width = inputs.shape
    step = max(1, _MAX_INPUT_BLOCK_ELEMENTS // max(1, batch * width))
    right = right.float()
    if step >= length:
        return inputs.float().transpose(1, 2) @ right
    total = inputs[:, :step].float().transpose(1, 2) @ right[:, :step]
    for start in range(step, length, step):
        block = inputs[:, start : start + step].float().transpose(1, 2)
        # accumulated in place: no product-sized part beside the total (at the goal shape,
        # T 4,096, the total and two parts, 160 MiB each, were the probe's peak)
        total.baddbmm_(block, right[:, start : start + step])
    return total


def batched_input_factor(
    inputs: torch.Tensor, norm: Norm, *, columns: int = 0, gram_work: int = 0
) -> torch.Tensor:
    """``[B, r, T]``: per batch row, ``R`` of ``X_b^T = Q R`` (nuclear, Frobenius: then
    ``||Gamma^T X_b|| = ||R Gamma||``), one batched QR, where it is smaller than ``X_b^T``
    (``T < d``) by enough to pay for itself (:func:`qr_pays`, for ``columns`` of ``Gamma``
    per row and ``gram_work`` flops of Gram matrices per row of ``R Gamma``); else an empty
    tensor: ``X_b^T`` itself serves, through :func:`input_product` (l1 needs the entries;
    with ``T >= d`` R is as large as ``X_b^T`` and the Gram matrices are the same), with no
    fp32 copy of it held."""
    _, length, dim = inputs.shape
    if norm == "l1" or not qr_pays(length, dim, columns, gram_work):
        return inputs.new_empty((0,), dtype=torch.float32)
    return qr_factor(inputs.float().transpose(1, 2))


def qr_pays(length: int, dim: int, columns: int, gram_work: int) -> bool:
    """Whether ``R`` of a ``[dim, length]`` ``X_b^T`` (``length`` rows instead of ``dim``)
    saves more flops than its QR costs (``2 d T^2 - 2 T^3 / 3``): each of the ``d - T`` rows
    it removes costs ``2 T`` flops per column of ``Gamma`` in the product and ``gram_work``
    in the Gram matrices. At T 250, d 256 (the bench shape) R removes 6 rows, ~2% of the work
    after it, for a QR of ~4% of the probe: not taken; at T 48, d 64 it is.

    >>> qr_pays(250, 256, 19 * 128, 4 * 19 * 128 * 128), qr_pays(48, 64, 96, 4 * 3 * 32 * 32)
    (False, True)
    >>> qr_pays(256, 256, 10**6, 0), qr_pays(16, 64, 0, 0)  # never at T >= d; no work to save
    (False, False)
    """
    if length >= dim:
        return False
    qr = 2 * dim * length**2 - 2 * length**3 / 3
    return (dim - length) * (2 * length * columns + gram_work) > qr
