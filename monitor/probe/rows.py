"""The general path, batched: one forward per bucket of targets, their backwards as one VJP.

Deep layers (or K/V where the last block's one-pass path does not apply)
need, per target ``z_t``, the output gradients ``g_s = dz_t/dy_s`` of each
probed projection at every position ``s <= t``: one backward per target
through every block above the lowest probed one. Here they are batched:

- Targets are sorted by t and cut into buckets (:func:`plan_buckets`); the
  sequences of a bucket are cut at the bucket's edge (its largest t + 1) and
  run through the model's own forward once, however many targets they hold.
- The targets' backwards run as one vector-Jacobian product over a batch of
  cotangents (``torch.autograd.grad(..., is_grads_batched=True)``). Slot k of
  the batch holds the k-th target of every sequence at once: rows never
  interact, so each target's gradients are read from its own row. The batch
  starts at the head's input (each target's gradient there comes first from
  one plain backward of the summed target logits), so the head and the
  model's logit post-processing are not replayed once per slot.
- Norms: all targets of a sequence in one forward see the very same input
  tensor ``X`` of a projection (Q, K and V of a block share it too), so its
  QR is taken once per (forward, sequence, input tensor) and each target's
  prefix of length t + 1 reads ``R[:, :t + 1]``
  (:func:`~inversion_monitor.metrics.norms.prefix_norms`); no QR of the
  output-side factor.

Cost: the forward covers each sequence once per bucket instead of once per
target; the backward is at least ``sum_k (t_k + 1)`` token-backwards through
the probed blocks whatever the method (each target's cotangent differs at
every position), and bucketing adds the positions between t and the edge.
:func:`plan_buckets` chooses the edges that minimise the estimated total.
Memory is bounded like the per-row path: slots x sequences x edge <=
``chunk_tokens`` per forward, and at most ``max_rows`` logit rows.

Sharded models (FSDP2, ZeRO-3) keep the per-row path: their backward hooks
are not written for batched cotangents.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inversion_monitor.metrics.norms import (
    Norm,
    input_factor,
    outer_sum_norm,
    prefix_norms,
    rank_one_norm,
)
from inversion_monitor.probe.architectures import select_columns
from inversion_monitor.probe.forward import ProbePlan

# cost model of plan_buckets, in token-forwards: one token's batched backward
# through the probed blocks, and the fixed cost of one forward + backward call
_BACKWARD_PER_TOKEN = 1.3
_CALL_TOKENS = 96.0
# at most this many candidate bucket edges (the planner is quadratic in them)
_MAX_EDGES = 128


@dataclass(frozen=True)
class Batch:
    """One forward of the batched general path.

    Attributes:
        edge: the sequences are cut to their first ``edge`` tokens.
        sequences: ``[S]`` rows of the plan's ``input_ids``.
        index: ``[n]`` targets measured (indices into the plan's targets).
        rows: ``[n]`` each target's position in ``sequences``.
        slots: ``[n]`` each target's cotangent slot (distinct within a row).
        width: number of slots (the VJP batch size).
    """

    edge: int
    sequences: torch.Tensor
    index: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    width: int


def _batch_shape(
    sequences: int, slots: int, edge: int, chunk_tokens: int, max_rows: int
) -> int | None:
    """Sequences per forward for a bucket, or None if even one breaks the budget."""
    if slots > 1 and (slots * edge > chunk_tokens or slots > max_rows):
        return None
    return max(1, min(sequences, chunk_tokens // max(1, slots * edge), max_rows // slots))


def plan_buckets(targets: torch.Tensor, chunk_tokens: int, max_rows: int) -> list[Batch]:
    """Forwards that measure every target ``(sequence, t)`` of ``targets`` ``[N, 2]`` once.

    Buckets are runs of targets sorted by t; a dynamic programme picks the
    edges minimising the estimated cost (forward tokens, plus slots x
    sequences x edge backward tokens, plus a fixed cost per call) under the
    memory budget.

    >>> batches = plan_buckets(torch.tensor([[0, 3], [1, 3], [0, 9]]), 8192, 64)
    >>> [(b.edge, b.index.tolist(), b.slots.tolist()) for b in batches]
    [(10, [0, 2, 1], [0, 1, 0])]
    """
    count = int(targets.shape[0])
    if count == 0:
        return []
    order = sorted(range(count), key=lambda i: (int(targets[i, 1]), int(targets[i, 0])))
    seq = [int(targets[i, 0]) for i in order]
    ends = [int(targets[i, 1]) + 1 for i in order]
    cuts = [i for i in range(1, count) if ends[i] != ends[i - 1]]
    if len(cuts) >= _MAX_EDGES:
        step = len(cuts) / (_MAX_EDGES - 1)
        cuts = sorted({cuts[int(k * step)] for k in range(_MAX_EDGES - 1)})
    bounds = [0, *cuts, count]
    best = [0.0] + [float("inf")] * (len(bounds) - 1)
    choice = [0] * len(bounds)
    for stop in range(1, len(bounds)):
        edge = ends[bounds[stop] - 1]
        counts: dict[int, int] = {}
        slots = 0
        for start in range(stop - 1, -1, -1):
            for i in range(bounds[start], bounds[start + 1]):
                counts[seq[i]] = counts.get(seq[i], 0) + 1
                slots = max(slots, counts[seq[i]])
            per_forward = _batch_shape(len(counts), slots, edge, chunk_tokens, max_rows)
            if per_forward is None:
                break  # longer runs only hold more slots
            calls = -(-len(counts) // per_forward)
            cost = (
                best[start]
                + len(counts) * edge * (1.0 + _BACKWARD_PER_TOKEN * slots)
                + calls * _CALL_TOKENS
            )
            if cost < best[stop]:
                best[stop], choice[stop] = cost, start
    batches: list[Batch] = []
    stop = len(bounds) - 1
    while stop > 0:
        start = choice[stop]
        if best[stop] == float("inf"):  # a single target above the budget: alone
            start = stop - 1
        members = order[bounds[start] : bounds[stop]]
        batches.extend(_split(targets, members, chunk_tokens, max_rows))
        stop = start
    return batches[::-1]


def _split(
    targets: torch.Tensor, members: list[int], chunk_tokens: int, max_rows: int
) -> Iterator[Batch]:
    """One bucket's forwards: its sequences in groups that fit the budget."""
    edge = max(int(targets[i, 1]) for i in members) + 1
    by_sequence: dict[int, list[int]] = {}
    for i in members:
        by_sequence.setdefault(int(targets[i, 0]), []).append(i)
    slots = max(len(v) for v in by_sequence.values())
    per_forward = _batch_shape(len(by_sequence), slots, edge, chunk_tokens, max_rows)
    sequences = sorted(by_sequence)
    if per_forward is None:  # one row per target (a lone target may exceed the budget)
        for i in members:
            yield _batch(targets, edge, [int(targets[i, 0])], {int(targets[i, 0]): [i]})
        return
    for start in range(0, len(sequences), per_forward):
        group = sequences[start : start + per_forward]
        yield _batch(targets, edge, group, {s: by_sequence[s] for s in group})


def _batch(
    targets: torch.Tensor, edge: int, sequences: list[int], members: dict[int, list[int]]
) -> Batch:
    """One forward; ``edge`` shrinks to the longest target it holds."""
    edge = min(edge, max(int(targets[i, 1]) for v in members.values() for i in v) + 1)
    index, rows, slots = [], [], []
    for row, sequence in enumerate(sequences):
        for slot, i in enumerate(members[sequence]):
            index.append(i)
            rows.append(row)
            slots.append(slot)
    return Batch(
        edge=edge,
        sequences=torch.tensor(sequences, dtype=torch.long),
        index=torch.tensor(index, dtype=torch.long),
        rows=torch.tensor(rows, dtype=torch.long),
        slots=torch.tensor(slots, dtype=torch.long),
        width=max(slots) + 1,
    )


@contextmanager
def _head_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The tensor the output embedding is applied to (after the probe's row selection)."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        hidden = args[0] if args else kwargs.get("input")
        if isinstance(hidden, torch.Tensor):
            seen.append(hidden)

    handle = head.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def measure_batch(plan: ProbePlan, batch: Batch) -> None:
    """Forward ``batch``'s sequences once; fill entropy and norms of its targets."""
    device = plan.input_ids.device
    index, rows, slots = (v.to(device) for v in (batch.index, batch.rows, batch.slots))
    t = plan.targets[index, 1]
    sequences = batch.sequences.to(device)
    with (
        _head_input(plan.resolved.head) as seen,
        plan.forward(sequences, batch.edge, rows, t) as forward,
    ):
        plan.entropy[index] = forward.entropy.to(plan.entropy.device)
        outputs = plan.outputs(forward)
        batched: list[torch.Tensor | None]
        if batch.width == 1:
            grads = torch.autograd.grad(forward.target_logits.sum(), outputs, allow_unused=True)
            batched = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            batched = list(_batched_backward(forward.target_logits, seen, outputs, slots, batch))
        _fill_norms(
            plan, inputs=forward.inputs, grads=batched, index=index, rows=rows, slots=slots, t=t
        )


def _batched_backward(
    target_logits: torch.Tensor,
    seen: list[torch.Tensor],
    outputs: list[torch.Tensor],
    slots: torch.Tensor,
    batch: Batch,
) -> tuple[torch.Tensor | None, ...]:
    """``[slots, ...]`` gradients of each output: slot k holds the k-th target of every row.

    Starts at the head's input ``[1, n, d]`` (one plain backward gives each
    target's own row there: the head sees each target's hidden state alone),
    so the head is not replayed per slot. If the head's input was not seen
    exactly once, one plain backward per slot from the target logits (a
    batched one would hold slots x targets x vocabulary logit gradients).
    """
    count = target_logits.shape[0]
    hidden = seen[0] if len(seen) == 1 else None
    if hidden is None or hidden.ndim != 3 or tuple(hidden.shape[:2]) != (1, count):
        slots = slots.to(target_logits.device)
        per_slot = [
            torch.autograd.grad(
                target_logits[slots == k].sum(),
                outputs,
                retain_graph=k < batch.width - 1,
                allow_unused=True,
            )
            for k in range(batch.width)
        ]
        return tuple(
            None if parts[0] is None else torch.stack([p for p in parts if p is not None])
            for parts in zip(*per_slot, strict=True)
        )
    (start,) = torch.autograd.grad(target_logits.sum(), hidden, retain_graph=True)
    cotangents = start.new_zeros(batch.width, *start.shape)
    cotangents[slots.to(start.device), 0, torch.arange(count, device=start.device)] = start[0]
    return torch.autograd.grad(
        hidden, outputs, cotangents, is_grads_batched=True, allow_unused=True
    )


def _fill_norms(
    plan: ProbePlan,
    *,
    inputs: Mapping[nn.Module, torch.Tensor],
    grads: list[torch.Tensor | None],
    index: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    t: torch.Tensor,
) -> None:
    """Each component's norm for the targets ``index`` from batched output gradients."""
    by_module = {id(m): g for m, g in zip(plan.modules, grads, strict=True)}
    factors: dict[tuple[Any, ...], torch.Tensor] = {}
    for component, (module, columns) in plan.sites.items():
        x = inputs[module]
        full = by_module[id(module)]
        if full is None:  # the output never reaches a target: G = 0
            plan.norms[component][index] = 0.0
            continue
        g = select_columns(full, columns)  # [slots, S, L, a]
        gamma = g[slots.to(g.device), rows.to(g.device)]  # [n, L, a]
        tt = t.to(g.device)
        arange = torch.arange(gamma.shape[0], device=g.device)
        if component in plan.rank_one:  # nothing after mixes positions: G = g_t x_t^T
            values = rank_one_norm(gamma[arange, tt], x[rows.to(x.device), tt], plan.norm)
        elif plan.norm == "l1":
            keep = torch.arange(gamma.shape[1], device=g.device) <= tt[:, None]
            values = outer_sum_norm(gamma * keep.unsqueeze(-1), x[rows.to(x.device)], "l1")
        else:
            values = torch.zeros(gamma.shape[0], dtype=torch.float32, device=g.device)
            # one QR per (sequence, input tensor): Q, K and V of a block see the same tensor
            key_base = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            for row in torch.unique(rows).tolist():
                chosen = (rows == row).nonzero().flatten()
                support = tt[chosen] + 1
                key = (*key_base, row)
                if key not in factors:
                    factors[key] = input_factor(x[row, : int(support.max())])
                factor = factors[key]
                span = factor.shape[1]
                values[chosen] = prefix_norms(
                    factor, gamma[chosen, :span], support.clamp_max(span), plan.norm
                )
        plan.norms[component][index] = values.to(plan.entropy.device)


# inputs of two rows cut from one sequence count as the same when they agree to
# this relative tolerance (they differ by rounding only: matmul blocking by shape)
_SAME_INPUT_RTOL = 1e-5


def per_row_norms(
    gamma: torch.Tensor, x: torch.Tensor, sequences: torch.Tensor, support: torch.Tensor, norm: Norm
) -> torch.Tensor:
    """Norms of ``Gamma_k[:m_k]^T X_k[:m_k]`` for rows cut from shared sequences.

    ``gamma`` ``[K, L, a]``, ``x`` ``[K, L, b]`` (each row's own forward),
    ``sequences`` ``[K]`` the sequence each row was cut from, ``support``
    ``[K]`` its length t + 1. Rows of one sequence see the same inputs up to
    rounding, so the longest row's input is factored once and serves every
    row whose prefix equals it to ``_SAME_INPUT_RTOL`` (checked, row by row);
    any other row gets its own factor. Nuclear and Frobenius only.

    >>> x = torch.randn(1, 4, 6).expand(2, 4, 6); g = torch.randn(2, 4, 3)
    >>> got = per_row_norms(g, x, torch.tensor([0, 0]), torch.tensor([4, 2]), "nuclear")
    >>> bool(torch.allclose(got[1], torch.linalg.matrix_norm(g[1, :2].T @ x[1, :2], "nuc")))
    True
    """
    out = torch.zeros(gamma.shape[0], dtype=torch.float32, device=gamma.device)
    support = support.to(gamma.device)
    for sequence in torch.unique(sequences).tolist():
        members = (sequences == sequence).nonzero().flatten().tolist()
        longest = max(members, key=lambda k: int(support[k]))
        span = int(support[longest])
        base = x[longest, :span].float()
        shared = input_factor(base)
        scale = float(base.abs().max())
        for k in members:
            m = int(support[k])
            own = x[k, :m].float()
            same = bool(((own - base[:m]).abs() <= _SAME_INPUT_RTOL * scale).all())
            factor = shared[:, :m] if same else input_factor(own)
            out[k] = prefix_norms(factor, gamma[k : k + 1, :m], support[k : k + 1], norm)[0]
    return out
