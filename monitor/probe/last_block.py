"""The last attention block's Q, K, V and O gradient norms for every target in one pass.

For the target logit ``z_t`` of position t and an attention block after
which nothing mixes positions (:func:`last_block_refusal` says when that
holds), one forward and one backward of ``sum_t z_t`` give, for every t at
once, ``g_t = dz_t / do_t`` at the attention function's output (o_t reaches
only z_t). The rest comes from the model's own attention function
(:mod:`inversion_monitor.probe.attention_capture`), replayed with one target
per batch element (:mod:`inversion_monitor.probe.attention_replay`): its query
row, its sequence's keys and values, its mask row. One backward of the replay with cotangent ``g_t``
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
vector-Jacobian products (:mod:`inversion_monitor.probe.key_value_norms`).
Where that map is the same linear map at every position (no RoPE: checked),
the gradient has rank <= H and its norm comes from H x H factors; otherwise
from the Gram form, one batched eigensolve per projection. Q and O are rank one
(``g_t x_t^T``); Q's ``g_t`` is the replays' ``dz/dq`` carried back to the
projection in one product, so the backward of ``sum_t z_t`` stops at the
attention output (the attention's own backward over every query is what
dominates at long T).

Every replay's output rows are checked against the recorded forward, and
its ``dz/dq`` against the model's own backward the first time an attention
module is probed (per implementation, dtype and device type; on a probe of the
targets in the first :data:`TAIL_CHECK_POSITIONS` positions, so that check's
every-position cotangent and ``dz/dq`` do not grow with T); on any
mismatch :class:`LastBlockRefused` is raised and the caller uses the
general path: never a silently wrong value. The hot path has no Python loop
over targets, heads, rows or positions: the checks and the route decisions of
both projections are computed on the device and read back together
(:class:`~inversion_monitor.probe.attention_replay.DeferredChecks`), so a
probe's host syncs and solves do not grow with its targets
(``benchmarks/bench_probe_counts.py``, ``tests/test_probe_counts.py``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from inversion_monitor.metrics.norms import Norm, rank_one_norm
from inversion_monitor.probe.architectures import (
    ResolvedModel,
    positions_mix_after,
    select_columns,
)
from inversion_monitor.probe.attention_capture import (
    AttentionCall,
    attention_function,
    attention_module,
    recording_attention,
)
from inversion_monitor.probe.attention_replay import (
    DeferredChecks,
    LastBlockRefused,
    TargetRows,
    UniqueTargets,
    check_shapes,
    head_terms,
)
from inversion_monitor.probe.forward import Component, ForwardPass, ProbePlan, Site
from inversion_monitor.probe.key_value_norms import (
    KeyValueRoute,
    PendingGrams,
    nuclear_norms_together,
    slot_ranks,
)
from inversion_monitor.probe.precision import ProbePrecision
from inversion_monitor.probe.split_forward import (
    AttentionPass,
    embedding_stand_in_holds,
    forward_attention,
    forward_rows,
    input_embedding,
)

__all__ = ["LastBlockRefused", "last_block_norms", "last_block_refusal"]

logger = logging.getLogger("inversion_monitor")

# attention modules whose replayed backward matched their own (dz/dq), per
# (implementation, dtype, device type): later probes skip that full backward
_VERIFIED_BACKWARD: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, torch.dtype, str]]] = (
    weakref.WeakKeyDictionary()
)
# last blocks whose tail, computed on the target positions alone, gave the whole forward's
# logits (per parameter dtype, device type and autocast), and those refused for good
_TAIL_VERIFIED: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, str, str]]] = (
    weakref.WeakKeyDictionary()
)
_TAIL_REFUSED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
# positions the tail check's whole forward covers (the targets among them are checked): its
# activations ([B, cut, intermediate] in the MLP) stay bounded at long T, the check as strict
# (what mixes positions besides the attention shows on the first positions' logits)
TAIL_CHECK_POSITIONS = 1024
# the forward over every position peaks near 5.5x its rows' hidden states (the block's norm
# output, its query and the model's RoPE temporaries at once: the goal shape, d 4,096, bf16,
# T 8,192, 1.367 GiB in one range); rows whose hidden states pass this many bytes go through
# the probe a range of rows at a time (0.752 GiB there, one row a range)
MAX_FORWARD_ROWS_BYTES = 64 << 20
# the route decisions of each K/V projection (``"factored"``, ``"rows apart"``), per
# projection name, dtype and device type: checked on its first probe, then taken as
# decided, as the replay's backward is (the map from the projection to the attention's keys
# or values is the model's code: RoPE fails the factored form's premise on every probe, a
# map that keeps batch rows apart keeps them on every batch). Rows apart is learnt from a
# batch of two rows or more
_ROUTE_DECISIONS: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[str, str, str], dict[str, bool]]
] = weakref.WeakKeyDictionary()


def last_block_position_refusal(resolved: ResolvedModel, layer: int) -> str | None:
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
    reason = last_block_position_refusal(resolved, layer)
    if reason is not None:
        return reason
    try:
        attention = attention_module(resolved.blocks[layer], next(iter(sites.values()))[0])
    except (LookupError, StopIteration) as exc:
        return str(exc)
    function = attention_function(attention)
    return function if isinstance(function, str) else None


def last_block_norms(
    resolved: ResolvedModel,
    layer: int,
    sites: Mapping[str, Site],
    *,
    targets: torch.Tensor,
    norm: Norm,
    plan: ProbePlan,
) -> tuple[torch.Tensor, dict[Component, torch.Tensor]]:
    """Entropy ``[N]`` and ``{(layer, proj): [N]}`` for the ``[N, 2]`` ``targets``.

    ``sites`` maps the requested projections to their (module, columns); ``plan``
    runs the two forwards. Duplicate targets are measured once. Rows whose hidden states
    (``[rows, T, d]``) pass :data:`MAX_FORWARD_ROWS_BYTES` go through the probe a range of
    rows at a time (:meth:`ProbePlan.row_range`: views). Raises :class:`LastBlockRefused`.
    """
    reason = last_block_refusal(resolved, layer, sites)
    if reason is not None:
        raise LastBlockRefused(reason)
    refused = _TAIL_REFUSED.get(resolved.blocks[layer])
    if refused is not None:
        raise LastBlockRefused(refused)
    sequences, rows = torch.unique(targets[:, 0], return_inverse=True)
    length = int(targets[:, 1].max()) + 1
    per_range = max(1, MAX_FORWARD_ROWS_BYTES // max(1, length * _hidden_bytes(resolved, plan)))
    if sequences.shape[0] > per_range:
        entropy = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
        ranged: dict[Component, torch.Tensor] = {}
        count = plan.input_ids.shape[0]
        # every range's targets at once: the targets in order of their row, cut by the count
        # of each range's (one sync for all ranges)
        order = torch.argsort(targets[:, 0], stable=True)
        per = torch.bincount(targets[order, 0] // per_range, minlength=-(-count // per_range))
        for number, index in enumerate(torch.split(order, per.tolist())):
            if not index.numel():  # a range without targets
                continue
            first = number * per_range  # a range of rows at a time, fed as views
            last = min(count, first + per_range)
            # the range's rows fit one range (as many rows or fewer, no longer), so this
            # call makes one pass
            part_entropy, part_norms = last_block_norms(
                resolved,
                layer,
                sites,
                targets=targets[index] - torch.tensor([first, 0], device=targets.device),
                norm=norm,
                plan=plan.row_range(first, last),
            )
            entropy[index] = part_entropy.to(entropy.device)
            for component, value in part_norms.items():
                ranged.setdefault(component, value.new_empty(targets.shape[0]))[index] = value
        return entropy, ranged
    block = resolved.blocks[layer]
    keys = rows * length + targets[:, 1]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    unique_rows = unique_keys // length
    slots = slot_ranks(unique_rows)
    unique = UniqueTargets(
        rows=unique_rows,
        t=unique_keys % length,
        inverse=inverse,
        slots=slots,
        packs=int(slots.max()) + 1,
    )
    attention = attention_module(block, next(iter(sites.values()))[0])
    parameter = next(block.parameters(), None)
    key = (
        str(None if parameter is None else parameter.dtype),
        plan.input_ids.device.type,
        repr(plan.precision),
    )
    tail = None  # the tail check's expected logits and the targets they are of
    if key not in _TAIL_VERIFIED.get(block, set()):
        cut, checked = _tail_check_cut(unique.t, length)
        if cut < length:
            # a block's first probe past the cut: its one-time checks (the attention's own
            # backward over every position, the tail, the embedding's stand-in, the K/V route
            # decisions) run on a probe of the targets in the cut, which reaches the branch
            # below; the probe over every position then holds no more than a later one (that
            # backward's every-position cotangent and dz/dq took the first probe's peak to
            # 6.4x the prefix at the goal shape, T 4,096)
            last_block_norms(
                resolved, layer, sites, targets=targets[targets[:, 1] < cut], norm=norm, plan=plan
            )
        else:
            # once per block: the whole forward's target logits, which the targets' rows
            # alone must reproduce (nothing in the block but its attention mixes positions);
            # values only: nothing backpropagates through it, so no graph is kept; over the
            # first positions only (TAIL_CHECK_POSITIONS, the cut), so its memory does not
            # grow with T
            with plan.forward(
                sequences, cut, unique.rows[checked], unique.t[checked], grad=False
            ) as full:
                tail = full.target_logits.detach(), checked
    # fed from a prefix, the embedding's output (the prefix's size) need not be held through
    # the forward over every position, where the model computes nothing its block takes from
    # it (checked once per model, on the first positions)
    stand_in = embedding_stand_in_holds(
        plan, sequences, min(length, TAIL_CHECK_POSITIONS), attention, key
    )
    # the forward over every position computes values only, except from K's and V's
    # projection outputs to the attention (their routes' vector-Jacobian products), and
    # stops at the attention function, whose own graph is kept only until its backward was
    # checked once (dz/dq)
    grad_from = {id(sites[p][0]): sites[p][0] for p in ("k", "v") if p in sites}
    with (
        recording_attention(
            attention, values_only=_VERIFIED_BACKWARD.get(attention, set()), stop=True
        ) as recorder,
        forward_attention(
            plan,
            sequences,
            length,
            attention,
            list(grad_from.values()),
            embedding_stand_in=stand_in,
        ) as before,
    ):
        if len(recorder.calls) != 1:
            raise LastBlockRefused(
                f"the attention function ran {len(recorder.calls)} times in one forward"
            )
        call = recorder.calls[0]
        check_shapes(call)
        output_rows = call.output.detach()[unique.rows, unique.t].unsqueeze(1).requires_grad_(True)
        recorder.substitute = output_rows  # the targets' forward takes the attention output
        with forward_rows(plan, sequences, unique.rows, unique.t, before) as out:
            if len(recorder.calls) != 2:
                raise LastBlockRefused(
                    f"the attention function ran {len(recorder.calls) - 1} times in one forward"
                )
            if tail is not None:
                expected, checked = tail
                tolerance = tail_tolerance(parameter, plan.precision)
                got = out.target_logits.detach()[checked]
                _check_tail(block, key, got, expected, tolerance)
            values = _norms(
                _Calls(call, recorder.calls[1], output_rows),
                before=before,
                out=out,
                sites=sites,
                unique=unique,
                norm=norm,
            )
    entropy = out.entropy[unique.inverse]
    return entropy, {(layer, proj): v[unique.inverse] for proj, v in values.items()}


def _hidden_bytes(resolved: ResolvedModel, plan: ProbePlan) -> int:
    """Bytes of one position's hidden state entering the probed block: the captured
    prefix's, else the input embedding's width and dtype (0 where neither is known: the
    rows then go through in one range)."""
    if plan.prefix is not None:
        hidden = plan.prefix.hidden
        return int(hidden.shape[-1]) * hidden.element_size()
    weight = getattr(input_embedding(resolved), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return 0
    return int(weight.shape[1]) * weight.element_size()


def _tail_check_cut(t: torch.Tensor, length: int) -> tuple[int, torch.Tensor]:
    """The tail check's cut of positions and the targets inside it (``[U]`` bool): the
    first :data:`TAIL_CHECK_POSITIONS` positions, or up to the earliest target when none
    falls there. One host read, on a block's first probe only.

    >>> _tail_check_cut(torch.tensor([3, 5000, 9]), 6000)
    (1024, tensor([ True, False,  True]))
    >>> _tail_check_cut(torch.tensor([3000, 5000]), 6000)
    (3001, tensor([ True, False]))
    """
    cut = min(length, max(TAIL_CHECK_POSITIONS, int(t.min()) + 1))
    return cut, t < cut


def tail_tolerance(parameter: torch.Tensor | None, precision: ProbePrecision | None) -> float:
    """How far (relative to the largest logit) the targets' rows alone may differ from the
    whole forward: the matmuls of one row and of every row round differently wherever they
    run in a lower precision (bf16/fp16 parameters, autocast, TF32 on CUDA; seen on an
    H200 under ``bf16=True``, where the logits come out fp32 but were computed in bf16).

    >>> tail_tolerance(torch.ones(1), ProbePrecision("cpu", torch.bfloat16, True))
    0.02
    >>> tail_tolerance(torch.ones(1), None)
    0.0001
    """
    if parameter is not None and parameter.dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    if precision is not None and precision.label(torch.float32) != "fp32":
        return 2e-2
    cuda = parameter is not None and parameter.device.type == "cuda"
    if cuda and torch.get_float32_matmul_precision() != "highest":
        return 5e-3  # TF32 (10 mantissa bits)
    return 1e-4


def _check_tail(
    block: nn.Module,
    key: tuple[str, str, str],
    got: torch.Tensor,
    expected: torch.Tensor,
    tolerance: float,
) -> None:
    """The targets' rows alone gave the whole forward's target logits (to ``tolerance``),
    else the block is refused for good, with the reason."""
    error = float((got.float() - expected.float()).abs().max())
    scale = float(expected.float().abs().max())
    if not error <= tolerance * max(scale, 1e-6):
        reason = (
            f"{type(block).__name__} computed on the target positions alone does not give the "
            f"whole forward's logits (relative error {error / max(scale, 1e-30):.2e}): something "
            "besides its attention mixes positions"
        )
        _TAIL_REFUSED[block] = reason
        raise LastBlockRefused(reason)
    _TAIL_VERIFIED.setdefault(block, set()).add(key)


def _route_decisions(sites: Mapping[str, Site], call: AttentionCall) -> dict[str, dict[str, bool]]:
    """The K/V projections' known route decisions (:data:`_ROUTE_DECISIONS`), by projection;
    the dicts are the cache's own (what a probe decides is added to them)."""
    dtype, device = str(call.key.dtype), call.key.device.type
    return {  # by projection too: a fused QKV module holds K and V (their columns)
        proj: _ROUTE_DECISIONS.setdefault(sites[proj][0], {}).setdefault((proj, dtype, device), {})
        for proj in ("k", "v")
        if proj in sites
    }


def _backward_key(call: AttentionCall) -> tuple[str, torch.dtype, str]:
    return (call.implementation, call.compute_dtype, call.query.device.type)


def _query_gradient(
    rows_call: AttentionCall, projection_output: torch.Tensor, query_grads: torch.Tensor
) -> torch.Tensor:
    """``[U, width]``: ``dz_t / dy_t`` at the query projection's output for every target, from
    the replays' ``dz/dq`` carried back through the map to the query (RoPE, q norm) of the
    targets' own forward (one position each) in one vector-Jacobian product."""
    cotangent = query_grads.to(rows_call.query.dtype)[:, :, None]
    (grad,) = torch.autograd.grad(rows_call.query, projection_output, cotangent, retain_graph=True)
    return grad[:, 0]


@dataclass(frozen=True)
class _Calls:
    """The attention call of the forward over every position (``whole``) and of the targets'
    own forward (``rows``), whose attention output was given as ``output_rows``."""

    whole: AttentionCall
    rows: AttentionCall
    output_rows: torch.Tensor


def _norms(
    calls: _Calls,
    *,
    before: AttentionPass,
    out: ForwardPass,
    sites: Mapping[str, Site],
    unique: UniqueTargets,
    norm: Norm,
) -> dict[str, torch.Tensor]:
    """The norms from the forward over every position up to the attention (``before``) and
    the targets' own forward from the attention output on (``out``)."""
    call, rows_call, output_rows = calls.whole, calls.rows, calls.output_rows
    wanted: Sequence[str] = list(sites)
    batch = call.key.shape[0]
    if rows_call.query.ndim != 4 or rows_call.query.shape[2] != 1:
        raise LastBlockRefused(
            f"the targets' own forward gave queries of shape {tuple(rows_call.query.shape)}"
        )
    # The attention output of the targets' forward is a leaf: this backward stops there, so
    # the attention's own backward over every query (what dominates at long T) is not run;
    # the replays give dz/dq, checked against that backward once per module, implementation
    # and dtype. It also gives what reaches each projection's output by any other path (a
    # gate on the attention output from the query projection).
    verify = _backward_key(call) not in _VERIFIED_BACKWARD.get(call.module, set())
    tensors = [output_rows, *[out.outputs[sites[proj][0]] for proj in wanted]]
    grads = torch.autograd.grad(
        out.target_logits.sum(), tensors, retain_graph=True, allow_unused=True
    )
    if grads[0] is None:
        raise LastBlockRefused("the target logits do not depend on the attention output")
    g = grads[0][:, 0]  # [U, H, dv]
    dq = None
    if verify:
        cotangent = torch.zeros_like(call.output)
        cotangent[unique.rows, unique.t] = g.to(call.output.dtype)
        (dq_all,) = torch.autograd.grad(
            call.output, call.leaves[0], cotangent, retain_graph=True, allow_unused=True
        )
        if dq_all is None:
            raise LastBlockRefused("the attention output does not depend on the queries")
        dq = dq_all[unique.rows, :, unique.t]  # [U, H, d]: every position's goes now
        del cotangent, dq_all
    # the replays take the whole forward's query and output at the targets only: the rest
    # (and, after dq, the attention's graph) goes before the replays' per-target copies
    target_rows = TargetRows(
        query=call.query.detach()[unique.rows, :, unique.t], output=output_rows.detach()[:, 0]
    )
    call.release_query_and_output()
    around = dict(zip(wanted, grads[1:], strict=True))  # paths around attention, [U, 1, w]
    checks = DeferredChecks()
    for proj in ("k", "v"):
        other = around.get(proj)
        if other is not None:
            checks.flag(f"{proj} around", select_columns(other, sites[proj][1]).any())
    # the targets' own forward saw the queries, keys and values the whole forward did
    for what, got, whole in (
        ("the targets' queries", rows_call.query, target_rows.query),
        ("the targets' keys", rows_call.key, call.key.detach()[unique.rows, :, unique.t]),
        ("the targets' values", rows_call.value, call.value.detach()[unique.rows, :, unique.t]),
    ):
        checks.close(got[:, :, 0], whole, unique.rows, what, batch=batch, dtype=call.compute_dtype)
    key_terms, value_terms, query_grads = head_terms(
        call, target_rows, g, dq=dq, unique=unique, checks=checks
    )
    backward_key = _backward_key(call)
    routes = [
        KeyValueRoute(
            name=proj,
            tensor=tensor,
            projection_output=before.outputs[sites[proj][0]],
            inputs=before.inputs[sites[proj][0]],
            columns=sites[proj][1],
            terms=terms,
        )
        for proj, tensor, terms in (("k", call.key, key_terms), ("v", call.value, value_terms))
        if proj in wanted
    ]
    decided = _route_decisions(sites, call)
    for route in routes:
        route.decide(unique, checks, decided[route.name])
    flags = checks.read()  # the replay's checks and every route decision, read together
    for route in routes:  # what this probe decided is kept; what was known joins the flags
        known = decided[route.name]
        for what in ("factored", "rows apart"):
            flag = f"{route.name} {what}"
            if flag in flags and (what == "factored" or route.tensor.shape[0] > 1):
                known[what] = flags[flag]
            elif what in known:
                flags[flag] = known[what]
    for proj in ("k", "v"):
        if flags.get(f"{proj} around"):
            raise LastBlockRefused(
                f"the {proj} projection's output reaches the logits other than through the "
                "attention's keys and values"
            )
    if verify:
        _VERIFIED_BACKWARD.setdefault(call.module, set()).add(backward_key)
    values: dict[str, torch.Tensor] = {}
    for proj in ("q", "o"):  # y_t reaches only z_t: G = g_t x_t^T
        if proj in wanted:
            module, columns = sites[proj]
            grad = around[proj]
            if proj == "q":  # through the attention (the replays' dz/dq), plus any other path
                through = _query_gradient(rows_call, out.outputs[module], query_grads)
                grad = through if grad is None else through + grad[:, 0]
            elif grad is None:
                raise LastBlockRefused("the o projection's output does not reach the logits")
            else:
                grad = grad[:, 0]
            values[proj] = rank_one_norm(
                select_columns(grad, columns), out.inputs[module][:, 0], norm
            )
    factors: dict[tuple[int, ...], torch.Tensor] = {}  # K and V usually share their input
    pending: dict[str, PendingGrams] = {}  # nuclear norms of K and V: one solve for both
    for route in routes:
        value = route.norms(unique, flags, norm, factors)
        if isinstance(value, PendingGrams):
            pending[route.name] = value
        else:
            values[route.name] = value
    factors.clear()  # the fp32 inputs ([B, d, T] at long T) are not needed by the solve
    solved = nuclear_norms_together({name: p.matrices for name, p in pending.items()})
    for name, grams in pending.items():
        values[name] = grams.norms(solved[name])
    return {proj: values[proj] for proj in wanted}
