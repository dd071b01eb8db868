"""Per-token entropy and logit-gradient strength: the measurement itself.

For a position t of sequence b, the target is the raw logit of the actual
next token, ``z = logits[b, t, input_ids[b, t + 1]]`` (after the model's own
logit scaling/soft-capping; not the loss, not the log-prob). For each
requested decoder block l and projection X in {q, k, v, o}, the gradient
strength is a norm of ``G = dz / dW_X^(l)``.

How it is computed, exactly (see ``docs``: science.md 1.2):

- ``G = sum_s g_s x_s^T`` over the positions s <= t of sequence b, where
  ``x_s`` is the projection's input and ``g_s = dz / dy_s`` the gradient at
  its output. Hooks capture ``x``; ``torch.autograd.grad`` on the captured
  outputs gives ``g``; no weight gradient is ever formed, ``.grad`` is never
  touched, and the backward stops at the lowest requested block.
- The logits come from the model's own forward (its head and its
  post-processing: scaling, soft-capping, multipliers), with the head fed
  only the target rows; nothing is inferred from config names.
- Last block, Q and O, where :func:`~inversion_monitor.probe.architectures.rank_one_exact`
  has checked that nothing after the block mixes positions: ``y_t`` reaches
  only ``z_t``, so G is rank one, ``||G|| = ||g_t|| ||x_t||``, and one backward
  of ``sum_t z_t`` gives every token at once (the fast path, used when only
  such components are asked).
- Anything else (the general path, :mod:`~inversion_monitor.probe.rows`):
  targets sorted by t are cut into buckets; each bucket's sequences run one
  forward, cut after the bucket's last t (later positions cannot reach z_t),
  and the targets' backwards run as one batched VJP, one cotangent slot per
  target of a sequence. The norm comes from one QR of each sequence's
  projection input, shared by its targets and by Q/K/V
  (:func:`~inversion_monitor.metrics.norms.prefix_norms`). Sharded models
  keep one row per target (the sequence cut after t), batched under a token
  budget.

Duplicate targets are measured once. Packed rows (``position_ids`` restarting
inside a row, with or without an attention mask) are cut into one row per
document, so documents never attend to each other. Sharded models run through
their own forward and backward hooks (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3):
parameters are gathered block by block as in training, weight gradients are
never formed and nothing is gathered for the norms.

The model is left as found: modes, RNG state, ``.grad``, hooks.

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("llama", num_layers=2)
>>> ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
>>> result = logit_gradient_norms(model, ids, layers=[0, -1], projections=("q", "v"))
>>> result.positions.shape, result.entropy.shape, sorted(result.norms)
(torch.Size([22, 2]), torch.Size([22]), [(0, 'q'), (0, 'v'), (1, 'q'), (1, 'v')])
>>> bool((result.score > 0).all())
True
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from inversion_monitor.metrics.norms import Norm, check_norm, outer_sum_norm, rank_one_norm
from inversion_monitor.probe.architectures import ResolvedModel, resolve_model, select_columns
from inversion_monitor.probe.forward import Component, ProbePlan, projection_sites
from inversion_monitor.probe.last_block import LastBlockRefused, last_block_norms
from inversion_monitor.probe.packing import document_index, same_document, split_documents
from inversion_monitor.probe.precision import ProbePrecision, without_autocast
from inversion_monitor.probe.prefix_capture import CapturedPrefix
from inversion_monitor.probe.rows import measure_batch, per_row_norms, plan_buckets
from inversion_monitor.probe.sampling import valid_positions
from inversion_monitor.probe.sharding import probe_leaves_shards, sharded_parameters
from inversion_monitor.proto.vocabulary import PROJECTIONS

logger = logging.getLogger("inversion_monitor")


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured, one entry per target token.

    Attributes:
        positions: ``[N, 2]`` (batch index, t) of each target.
        entropy: ``[N]`` predictive entropy at t, nats (fp32).
        norms: ``{(layer, projection): [N]}`` gradient strengths (fp32);
            layer indices are non-negative.
        score: ``[N]`` mean of ``norms`` over its entries.
        tokens: ``[N]`` the target token ids ``input_ids[b, t + 1]``.
        paths: ``{(layer, projection): path}``, how each entry was computed:
            ``"rank_one"``, ``"last_block"`` (one pass,
            :mod:`~inversion_monitor.probe.last_block`) or ``"general"`` (one
            row per target).
        prefix: ``"captured"`` when the blocks below the lowest probed one
            were skipped and it started from the training forward's hidden
            states (:mod:`~inversion_monitor.probe.prefix_capture`), else
            ``"recomputed"``.
        prefix_reason: why a given captured prefix was not used (None when
            it was, or when none was given).
        precision: what the model's forward computed in
            (:meth:`~inversion_monitor.probe.precision.ProbePrecision.label`):
            ``"bf16-autocast"``/``"fp16-autocast"`` under the training forward's
            autocast, else the parameters' dtype (``"fp32"``, ``"bf16"``, ...).

    >>> r = ProbeResult(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), {}, torch.zeros(0),
    ...                 torch.zeros(0, dtype=torch.long))
    >>> len(r)
    0
    """

    positions: torch.Tensor
    entropy: torch.Tensor
    norms: dict[Component, torch.Tensor]
    score: torch.Tensor
    tokens: torch.Tensor
    paths: dict[Component, str] = field(default_factory=dict)
    prefix: str = "recomputed"
    prefix_reason: str | None = None
    precision: str = "fp32"

    def __len__(self) -> int:
        return int(self.positions.shape[0])


def _expand_position_ids(
    position_ids: torch.Tensor | None, input_ids: torch.Tensor
) -> torch.Tensor | None:
    """``position_ids`` checked and broadcast to ``[B, T]`` (a ``[1, T]`` one is shared)."""
    if position_ids is None:
        return None
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.is_floating_point()
        or position_ids.dtype == torch.bool
    ):
        raise TypeError("position_ids must be an integer tensor [batch, seq_len] or [1, seq_len]")
    batch, length = input_ids.shape
    if (
        position_ids.ndim != 2
        or position_ids.shape[1] != length
        or position_ids.shape[0]
        not in (
            1,
            batch,
        )
    ):
        raise ValueError(
            f"position_ids must be [batch, seq_len] = {tuple(input_ids.shape)} or "
            f"[1, seq_len], got {tuple(position_ids.shape)}"
        )
    return position_ids.to(device=input_ids.device, dtype=torch.long).expand(batch, length)


def _check_inputs(
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    positions: torch.Tensor | None,
    projections: Sequence[str],
    norm: str,
    chunk_tokens: int,
) -> torch.Tensor:
    """Validate everything; returns the ``[N, 2]`` target positions."""
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if not projections or any(p not in PROJECTIONS for p in projections):
        raise ValueError(
            f"projections must be a non-empty subset of {PROJECTIONS}, got {projections!r}"
        )
    if len(set(projections)) != len(projections):
        raise ValueError(f"projections contains duplicates: {projections!r}")
    check_norm(norm)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    valid = valid_positions(input_ids, attention_mask)
    valid &= same_document(position_ids, attention_mask, input_ids.shape).to(valid.device)
    if positions is None:
        return valid.nonzero()
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.long:
        raise TypeError("positions must be a LongTensor [N, 2] of (batch index, t)")
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must be [N, 2], got {tuple(positions.shape)}")
    positions = positions.to(input_ids.device)
    batch, length = input_ids.shape
    in_range = (
        (positions[:, 0] >= 0)
        & (positions[:, 0] < batch)
        & (positions[:, 1] >= 0)
        & (positions[:, 1] < length)
    )
    ok = in_range.clone()
    ok[in_range] = valid[positions[in_range, 0], positions[in_range, 1]]
    if not bool(ok.all()):
        bad = positions[~ok][:5].tolist()
        raise ValueError(
            f"positions {bad} cannot be targets: each (b, t) needs t + 1 < seq_len "
            f"({length}), real (non-padding) tokens at t and t + 1, and t + 1 in the same "
            "packed document as t (position_ids must not restart at t + 1)"
        )
    return positions


@contextmanager
def _model_left_as_found(model: nn.Module) -> Iterator[None]:
    """Eval mode and forked RNG inside; every module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def _chunks(lengths: torch.Tensor, chunk_tokens: int, max_rows: int) -> Iterator[torch.Tensor]:
    """Indices of targets grouped so each group's rows x max length fits the budget."""
    order = torch.argsort(lengths, stable=True).tolist()
    group: list[int] = []
    for index in order:
        longest = int(lengths[index])  # ascending, so the newest is the longest
        if group and ((len(group) + 1) * longest > chunk_tokens or len(group) >= max_rows):
            yield torch.tensor(group, dtype=torch.long)
            group = []
        group.append(index)
    if group:
        yield torch.tensor(group, dtype=torch.long)


def logit_gradient_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    projections: Sequence[str] = PROJECTIONS,
    norm: Norm = "nuclear",
    chunk_tokens: int = 8192,
    prefix: CapturedPrefix | None = None,
    precision: ProbePrecision | None = None,
) -> ProbeResult:
    """Entropy and logit-gradient strength at each target token.

    Args:
        model: a Hugging Face causal LM (possibly wrapped by DDP, DeepSpeed,
            PEFT or ``torch.compile``, or sharded with FSDP2 ``fully_shard``);
            see :mod:`inversion_monitor.probe.architectures`.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens (right or left padding).
        position_ids: ``[B, T]`` or ``[1, T]``, passed to the model; where
            they restart inside a row (packing), each document is probed alone.
        positions: ``[N, 2]`` (batch index, t) targets; None = every valid t.
            A target given twice is measured once (both entries get the values).
        layers: decoder-block indices, negative from the end; default ``[-1]``.
        projections: subset of ``("q", "k", "v", "o")``.
        norm: ``"nuclear"`` (default), ``"frobenius"`` or ``"l1"``.
        chunk_tokens: token budget of one forward/backward (bounds memory:
            rows x length <= chunk_tokens, at least one row; at most 32 Mi
            logits are held at once).
        prefix: the training forward's input of a block at or below the
            lowest probed one (:class:`~inversion_monitor.probe.prefix_capture.PrefixCapture`):
            the blocks below it are skipped. Used only where exact (see
            :meth:`~inversion_monitor.probe.prefix_capture.CapturedPrefix.refusal`;
            not on packed rows nor on sharded parameters), else recomputed;
            :attr:`ProbeResult.prefix` and ``prefix_reason`` say which.
        precision: the autocast the model's forward runs under (the training
            forward's); default: the prefix's
            (:attr:`~inversion_monitor.probe.prefix_capture.CapturedPrefix.precision`)
            if one is given, else the autocast active at the call (a custom
            loop calling inside its ``torch.autocast`` block). Only the model's
            forward runs under it; the factor math (QR, Gram matrices,
            eigenvalues, entropy sums) computes in fp32/fp64. Under bf16 the
            values equal a brute force under the same autocast to a few bf16
            roundings (``tests/test_probe_autocast.py`` states the bound), not
            the fp32 values (bf16 rounds to 2**-8 relative).
            :attr:`ProbeResult.precision` says which ran.

    Returns:
        A :class:`ProbeResult` with one entry per target, in ``positions`` order.

    Raises:
        NotImplementedError: what cannot be measured exactly (an unknown model
            type, FSDP1, a layer without softmax attention, K/V of a KV-sharing
            layer), with the reason and what to do instead.
    """
    with torch.inference_mode(False):  # a caller inside inference_mode still gets results
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
            raise TypeError("input_ids must be a LongTensor [batch, seq_len]")
        if input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError(
                "input_ids must be [batch, seq_len] with seq_len >= 2, "
                f"got {tuple(input_ids.shape)}"
            )
        input_ids = input_ids.clone() if input_ids.is_inference() else input_ids
        if attention_mask is not None and attention_mask.is_inference():
            attention_mask = attention_mask.clone()
        if positions is not None and positions.is_inference():
            positions = positions.clone()
        if position_ids is not None and position_ids.is_inference():
            position_ids = position_ids.clone()
        chosen = _precision(precision, prefix, input_ids)  # read before autocast goes off
        with without_autocast():  # on again for the model's forward only (ProbePlan.forward)
            return _probe(
                model,
                input_ids,
                attention_mask=attention_mask,
                position_ids=_expand_position_ids(position_ids, input_ids),
                positions=positions,
                layers=layers,
                projections=projections,
                norm=norm,
                chunk_tokens=chunk_tokens,
                prefix=prefix,
                precision=chosen,
            )


def _precision(
    precision: ProbePrecision | None, prefix: CapturedPrefix | None, input_ids: torch.Tensor
) -> ProbePrecision:
    """The given precision, else the captured forward's, else the caller's autocast."""
    if precision is not None:
        if not isinstance(precision, ProbePrecision):
            raise TypeError(f"precision must be a ProbePrecision, got {type(precision).__name__}")
        return precision
    if isinstance(prefix, CapturedPrefix):
        return prefix.precision
    return ProbePrecision.current(input_ids.device.type)


def _probe(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    positions: torch.Tensor | None,
    layers: Sequence[int] | None,
    projections: Sequence[str],
    norm: Norm,
    chunk_tokens: int,
    prefix: CapturedPrefix | None,
    precision: ProbePrecision,
) -> ProbeResult:
    targets = _check_inputs(
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        positions=positions,
        projections=projections,
        norm=norm,
        chunk_tokens=chunk_tokens,
    )
    resolved = resolve_model(model)
    layer_ids = sorted({resolved.layer_index(layer) for layer in (layers or [-1])})
    sites = projection_sites(resolved, layer_ids, list(projections))
    count = targets.shape[0]
    device = input_ids.device
    unique, inverse = (
        torch.unique(targets, dim=0, return_inverse=True)
        if count
        else (targets, torch.zeros(0, dtype=torch.long, device=device))
    )
    ids, mask, pos, work = input_ids, attention_mask, position_ids, unique
    prefix_reason = None
    if prefix is not None:
        prefix_reason = _prefix_refusal(
            prefix,
            resolved,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            lowest_block=layer_ids[0],
        )
    if count and document_index(position_ids, attention_mask) is not None:
        assert position_ids is not None
        docs = split_documents(input_ids, attention_mask, position_ids, unique)
        ids, mask, pos, work = docs.input_ids, docs.attention_mask, docs.position_ids, docs.targets
        if prefix is not None:
            prefix_reason = prefix_reason or "packed rows are probed one document per row"
    plan = ProbePlan.for_targets(
        resolved,
        ids,
        work,
        sites,
        attention_mask=mask,
        position_ids=pos,
        norm=norm,
        prefix=prefix if prefix is not None and prefix_reason is None else None,
        precision=precision,
    )
    paths: dict[Component, str] = {}
    if count:
        with _model_left_as_found(resolved.model), probe_leaves_shards(resolved.model):
            if plan.rank_one == set(sites):
                for group in _rank_one_groups(plan, chunk_tokens):
                    _probe_rank_one(plan, group.to(device))
                paths = dict.fromkeys(sites, "rank_one")
            else:
                paths = _probe_last_block(plan)
                rest = {c: site for c, site in sites.items() if c not in paths}
                if rest:
                    general = replace(plan, sites=rest, lowest_block=min(c[0] for c in rest))
                    _probe_general(general, chunk_tokens)
                    paths.update(dict.fromkeys(rest, "general"))
    norms = {c: values[inverse] for c, values in sorted(plan.norms.items())}
    score = (
        torch.stack(list(norms.values())).mean(0)
        if count
        else torch.zeros(0, dtype=torch.float32, device=device)
    )
    return ProbeResult(
        positions=targets,
        entropy=plan.entropy[inverse],
        norms=norms,
        score=score,
        tokens=input_ids[targets[:, 0], targets[:, 1] + 1],
        paths=dict(sorted(paths.items())),
        prefix="captured" if plan.prefix is not None and count else "recomputed",
        prefix_reason=prefix_reason,
        precision=precision.label(_parameter_dtype(plan)),
    )


def _parameter_dtype(plan: ProbePlan) -> torch.dtype:
    """The dtype of the probed projections' weights (fp32 when they have none)."""
    for module, _ in plan.sites.values():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
    return torch.float32


def _prefix_refusal(
    prefix: CapturedPrefix,
    resolved: ResolvedModel,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    lowest_block: int,
) -> str | None:
    """None if the probe may start from ``prefix``, else why it recomputes."""
    if not isinstance(prefix, CapturedPrefix):
        raise TypeError(f"prefix must be a CapturedPrefix, got {type(prefix).__name__}")
    if prefix.layer > lowest_block:
        return f"the prefix enters block {prefix.layer}, above the lowest probed block"
    if sharded_parameters(resolved.model):
        return (
            "sharded parameters (FSDP2, ZeRO-3): skipping blocks would bypass the "
            "framework's gather and release hooks"
        )
    return prefix.refusal(resolved.model, input_ids, attention_mask, position_ids)


# logits [rows, vocab] that one forward of the rank-one path may hold (32 Mi elements)
_LOGIT_ELEMENTS = 1 << 25


def _vocab_size(resolved: ResolvedModel) -> int:
    """Output width of the head (for memory budgeting only; values never depend on it)."""
    width = getattr(resolved.head, "out_features", None)
    if isinstance(width, int) and width > 0:
        return width
    vocab = getattr(resolved.config, "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else 1 << 17


def _rank_one_groups(plan: ProbePlan, chunk_tokens: int) -> Iterator[torch.Tensor]:
    """Targets grouped by sequence: sequences x length <= chunk_tokens, rows x vocab bounded."""
    max_rows = max(1, _LOGIT_ELEMENTS // _vocab_size(plan.resolved))
    targets = plan.targets.cpu()  # one read-back; the grouping is a host decision
    order = torch.argsort(targets[:, 0] * (plan.input_ids.shape[1] + 1) + targets[:, 1])
    pairs = targets.tolist()
    group: list[int] = []
    sequences: set[int] = set()
    length = 0
    for index in order.tolist():
        seq, t = pairs[index]
        grown, longest = len(sequences | {seq}), max(length, t + 1)
        if group and (grown * longest > chunk_tokens or len(group) >= max_rows):
            yield torch.tensor(group, dtype=torch.long)
            group, sequences = [], set()
            longest = t + 1
        group.append(index)
        sequences.add(seq)
        length = longest
    if group:
        yield torch.tensor(group, dtype=torch.long)


def _probe_rank_one(plan: ProbePlan, group: torch.Tensor) -> None:
    """Rank-one components only: one forward and one backward over the group's sequences."""
    sequences, rows = torch.unique(plan.targets[group, 0], return_inverse=True)
    _measure(plan, group, sequences, rows)


def _probe_general(plan: ProbePlan, chunk_tokens: int) -> None:
    """Every target through the general path: batched VJPs, or one row per target if sharded.

    See :mod:`~inversion_monitor.probe.rows`. Sharded parameters keep one row
    per target: their frameworks' backward hooks expect plain cotangents.
    """
    max_rows = max(1, _LOGIT_ELEMENTS // _vocab_size(plan.resolved))
    device = plan.input_ids.device
    if _sharded(plan.resolved.model):
        for group in _chunks(plan.targets[:, 1] + 1, chunk_tokens, max_rows):
            _probe_rows(plan, group.to(device))
        return
    for batch in plan_buckets(plan.targets.cpu(), chunk_tokens, max_rows):
        measure_batch(plan, batch)


def _probe_rows(plan: ProbePlan, group: torch.Tensor) -> None:
    """General path: one row per target (its sequence cut after t), one backward for all."""
    _measure(plan, group, plan.targets[group, 0], torch.arange(group.shape[0], device=group.device))


def _measure(
    plan: ProbePlan, index: torch.Tensor, sequences: torch.Tensor, rows: torch.Tensor
) -> None:
    """Forward ``sequences`` (cut after the last target); fill entropy and norms of targets
    ``index`` (found at forward rows ``rows``)."""
    t = plan.targets[index, 1]
    with plan.forward(sequences, int(t.max()) + 1, rows, t) as forward:
        plan.entropy[index] = forward.entropy.to(plan.entropy.device)
        grads = plan.gradients(forward)
        for component, (module, columns) in plan.sites.items():
            g, x = grads[id(module)], forward.inputs[module]
            if component in plan.rank_one:  # nothing after mixes positions: G = g_t x_t^T
                values = rank_one_norm(select_columns(g[rows, t], columns), x[rows, t], plan.norm)
            elif plan.norm == "l1":
                values = outer_sum_norm(select_columns(g, columns), x, plan.norm)
            else:  # one row per target: one input QR per sequence where the rows agree
                values = per_row_norms(
                    select_columns(g, columns), x, plan.targets[index, 0], t + 1, plan.norm
                )
            plan.norms[component][index] = values.to(plan.entropy.device)


def _probe_last_block(plan: ProbePlan) -> dict[Component, str]:
    """The last block's components in one pass where eligible; ``{}`` (general path) if not.

    See :mod:`~inversion_monitor.probe.last_block`. Not used on sharded
    parameters (FSDP2 DTensors, ZeRO-3 partitions): the one-pass replay reads
    the attention module outside the framework's own forward.
    """
    resolved = plan.resolved
    layer = resolved.num_layers - 1
    wanted = {c[1]: site for c, site in plan.sites.items() if c[0] == layer}
    if len(wanted) < len(plan.sites):  # the general path runs anyway: it adds these for free
        return {}
    if not set(wanted) & {"k", "v"} or _sharded(resolved.model):
        return {}
    # every site is in the last block, so the plan's forward starts there
    try:
        entropy, norms = last_block_norms(
            resolved, layer, wanted, targets=plan.targets, norm=plan.norm, plan=plan
        )
    except LastBlockRefused as exc:
        logger.debug("last-block one-pass path not used: %s", exc)
        return {}
    plan.entropy.copy_(entropy)
    for component, values in norms.items():
        plan.norms[component].copy_(values)
    return dict.fromkeys(norms, "last_block")


_sharded = sharded_parameters
