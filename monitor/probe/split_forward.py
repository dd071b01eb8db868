"""The last-block probe's two forwards: every position up to the attention, then the targets alone.

:func:`forward_attention` runs the model's own forward over every position of
the probed rows until the probed block's attention module returns (nothing
after it runs, so nothing after it is recorded for every position);
:func:`forward_rows` runs the model's own forward on one position per target
from that block on, the block fed the hidden states and keyword arguments
(position ids, rotary tables) the first forward had at the targets. Where
nothing in the block but its attention mixes positions, the second gives the
whole forward's logits (:mod:`~inversion_monitor.probe.last_block` checks it
once per block, and checks the queries, keys and values every time).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inversion_monitor.metrics.entropy import token_entropy
from inversion_monitor.probe.architectures import ResolvedModel
from inversion_monitor.probe.attention_capture import AttentionRecorded
from inversion_monitor.probe.forward import (
    ForwardPass,
    ProbePlan,
    _Captures,
    _fed_from,
    _GradFrom,
    _HeadRows,
    _logits,
    _Prefix,
)
from inversion_monitor.probe.precision import ProbePrecision

__all__ = [
    "AttentionPass",
    "embedding_stand_in_holds",
    "embedding_stood_in",
    "forward_attention",
    "forward_rows",
    "input_embedding",
]

# per model: for each (parameter dtype, device type, precision), whether the probed block's
# keyword arguments come out the same with the input embedding stood in for
_STAND_IN_HOLDS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], bool]] = (
    weakref.WeakKeyDictionary()
)


class _AttentionDone(Exception):
    """Raised after the probed attention module returns: the rest of the forward is not needed."""


def _select_at(value: Any, batch: int, length: int, rows: torch.Tensor, t: torch.Tensor) -> Any:
    """``value`` (a block keyword argument) at the targets where it is indexed ``[batch or 1,
    length, ...]`` (position ids, rotary tables): ``[K, 1, ...]``; tuples, lists and dicts
    elementwise; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] in (batch, 1) and value.shape[1] == length:
            picked_rows = rows if value.shape[0] == batch else torch.zeros_like(rows)
            return value[picked_rows.to(value.device), t.to(value.device)].unsqueeze(1)
        return value
    if isinstance(value, tuple | list):
        return type(value)(_select_at(v, batch, length, rows, t) for v in value)
    if isinstance(value, dict):
        return {k: _select_at(v, batch, length, rows, t) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class AttentionPass:
    """The forward up to the probed block's attention, over every position of its rows.

    ``inputs``/``outputs``: each hooked module's input and output (emptied on exit);
    ``block_kwargs``: the keyword arguments the block received (position ids, rotary
    tables), so :meth:`ProbePlan.forward_rows` can give the block the same at the targets;
    ``hidden``: the hidden states entering the block (``[B, T, d]``, no graph).
    """

    inputs: Mapping[nn.Module, torch.Tensor]
    outputs: Mapping[nn.Module, torch.Tensor]
    block_kwargs: dict[str, Any]
    hidden: torch.Tensor


def _run_attention(
    resolved: ResolvedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    block: int,
    attention: nn.Module,
    captures: _Captures,
    grad_from: Sequence[nn.Module],
    prefix: _Prefix | None,
    precision: ProbePrecision | None,
    embedding_stand_in: bool = False,
) -> AttentionPass:
    """The model's own forward of ``input_ids`` until block ``block``'s ``attention`` module
    returns (or its recorder stops it); nothing after it runs. Values only, except from the
    outputs of the ``grad_from`` modules on: each becomes a fresh leaf, so the only graph is
    that of the maps from them to the attention (nothing the norm, the other projections or
    the block's input would save for a backward is held for every position). With
    ``embedding_stand_in`` and a ``prefix``: :func:`embedding_stood_in`."""
    received: dict[str, Any] = {}
    hidden: list[torch.Tensor] = []

    def record(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        received.update(kwargs)
        incoming = args[0] if args else kwargs.get("hidden_states")
        if isinstance(incoming, torch.Tensor):
            hidden.append(incoming.detach())
        return args, kwargs

    def leaf(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        torch.set_grad_enabled(True)  # the caller's mode is restored by no_grad's exit
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.detach().requires_grad_(True)
        return None

    def stop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise _AttentionDone

    extra = {} if position_ids is None else {"position_ids": position_ids}
    handles = [
        resolved.blocks[block].register_forward_pre_hook(record, with_kwargs=True),
        attention.register_forward_hook(stop),
        *(module.register_forward_hook(leaf, prepend=True) for module in grad_from),
    ]
    try:
        autocast = nullcontext() if precision is None else precision.forward_context()
        stand_in = embedding_stood_in(resolved) if embedding_stand_in and prefix else nullcontext()
        with torch.no_grad(), _fed_from(resolved, prefix), stand_in, autocast:
            try:
                resolved.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
                )
            except (_AttentionDone, AttentionRecorded):
                pass
            else:
                raise RuntimeError("the probed attention module did not run in the forward")
    finally:
        for handle in handles:
            handle.remove()
    if not hidden:
        raise RuntimeError("the lowest probed block did not run in the model's forward")
    received.pop("hidden_states", None)
    return AttentionPass(
        inputs=captures.inputs,
        outputs=captures.outputs,
        block_kwargs=received,
        hidden=hidden[0],
    )


def _run_rows(
    resolved: ResolvedModel,
    input_ids: torch.Tensor,
    *,
    block: int,
    hidden: torch.Tensor,
    block_kwargs: dict[str, Any],
    captures: _Captures,
    tokens: torch.Tensor,
    precision: ProbePrecision | None,
) -> ForwardPass:
    """The model's own forward of one position per target (``input_ids`` ``[K, 1]``), block
    ``block`` fed ``hidden`` ``[K, 1, d]`` and the keyword arguments in ``block_kwargs``
    (the full forward's, at the targets) in place of its own."""
    count = input_ids.shape[0]
    index = torch.arange(count, device=input_ids.device)
    head = _HeadRows(resolved.head, (count, 1), index, torch.zeros_like(index))
    start = _GradFrom(resolved.blocks[block])

    def replace(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, **block_kwargs}

    handle = resolved.blocks[block].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        autocast = nullcontext() if precision is None else precision.forward_context()
        with start.active(), _fed_from(resolved, (block, hidden)):
            with autocast:
                out = resolved.model(input_ids=input_ids, use_cache=False)
            logits = _logits(out)
            if head.calls != 1 or tuple(logits.shape[:2]) != (1, count):
                raise NotImplementedError(
                    f"the model's forward of {count} single positions gave logits of shape "
                    f"{tuple(logits.shape)}"
                )
            logits = logits[0]
            entropy = token_entropy(logits.detach())
            z = logits.gather(1, tokens[:, None].to(logits.device))[:, 0].float()
    finally:
        handle.remove()
        head.remove()
    if start.leaf is None:
        raise RuntimeError("the probed block did not run in the model's forward")
    return ForwardPass(
        entropy=entropy,
        target_logits=z,
        inputs=captures.inputs,
        outputs=captures.outputs,
        leaf=start.leaf,
    )


@contextmanager
def forward_attention(
    plan: ProbePlan,
    sequences: torch.Tensor,
    length: int,
    attention: nn.Module,
    grad_from: Sequence[nn.Module],
    *,
    embedding_stand_in: bool = False,
) -> Iterator[AttentionPass]:
    """The model's forward of rows ``sequences`` cut to ``length`` tokens, up to the
    lowest probed block's ``attention`` module (nothing after it runs), with a graph only
    from the outputs of ``grad_from`` on (their inputs and outputs are captured); the
    hooks' captures are released on exit. ``embedding_stand_in``: fed from the plan's
    prefix, the input embedding's output is :func:`embedding_stood_in` (only where
    :func:`embedding_stand_in_holds`)."""
    ids, mask, pos, prefix = plan.cut(sequences, length)
    captures = _Captures(grad_from)
    try:
        before = _run_attention(
            plan.resolved,
            ids,
            attention_mask=mask,
            position_ids=pos,
            block=plan.lowest_block,
            attention=attention,
            captures=captures,
            grad_from=grad_from,
            prefix=prefix,
            precision=plan.precision,
            embedding_stand_in=embedding_stand_in,
        )
        captures.stop()  # what runs inside (the targets' own forward) is not captured
        yield before
    finally:
        captures.remove()


@contextmanager
def forward_rows(
    plan: ProbePlan,
    sequences: torch.Tensor,
    rows: torch.Tensor,
    t: torch.Tensor,
    before: AttentionPass,
) -> Iterator[ForwardPass]:
    """The model's forward of the targets alone (forward row ``rows[k]`` of
    ``sequences``, position ``t[k]``), one position each, from the lowest probed
    block on: that block gets the hidden states and keyword arguments ``before`` saw
    at the targets. Exact where nothing in that block but its attention mixes
    positions (the caller checks); the hooks' captures are released on exit."""
    batch, length = before.hidden.shape[:2]
    hidden = before.hidden[rows, t].unsqueeze(1)
    kwargs = {
        k: _select_at(v, batch, length, rows, t)
        for k, v in before.block_kwargs.items()
        if k != "attention_mask"
    }
    ids = plan.input_ids[sequences[rows], t].unsqueeze(1)
    captures = _Captures(plan.modules)
    try:
        yield _run_rows(
            plan.resolved,
            ids,
            block=plan.lowest_block,
            hidden=hidden,
            block_kwargs=kwargs,
            captures=captures,
            tokens=plan.input_ids[sequences[rows], t + 1],
            precision=plan.precision,
        )
    finally:
        captures.remove()


def input_embedding(resolved: ResolvedModel) -> nn.Module | None:
    """The model's input embedding (``get_input_embeddings``), or None where it has none."""
    get = getattr(resolved.model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    return embedding if isinstance(embedding, nn.Module) else None


@contextmanager
def embedding_stood_in(resolved: ResolvedModel) -> Iterator[None]:
    """While inside, the model's input embedding returns zeros of its output's shape and
    dtype that hold no memory (one element, seen through stride-0 dimensions) instead of
    its output, which goes as soon as it is made.

    For a forward fed from a captured prefix only: the blocks below the prefix's are
    skipped and the prefix replaces the hidden states entering its block, so at
    Llama-like models the embedding's output (the size of the prefix, ``[B, T, d]``) is
    held through the whole forward for nothing. A model may still compute what its blocks
    receive from it (per-layer inputs): :func:`embedding_stand_in_holds` checks that.
    """
    embedding = input_embedding(resolved)
    if embedding is None:
        yield
        return

    def stand_in(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.new_zeros(()).expand(output.shape)
        return None

    handle = embedding.register_forward_hook(stand_in)
    try:
        yield
    finally:
        handle.remove()


def embedding_stand_in_holds(
    plan: ProbePlan,
    sequences: torch.Tensor,
    length: int,
    attention: nn.Module,
    key: tuple[str, ...],
) -> bool:
    """Whether :func:`forward_attention` may stand in for the input embedding (fed from
    ``plan``'s prefix): the probed block's keyword arguments (rotary tables, masks,
    anything the model computes for its blocks) come out equal, value for value, with
    and without it. Checked once per model and ``key`` (dtype, device, precision) on the
    first ``length`` positions (a cut: no more memory than a later forward); a forward
    that fails with the stand-in (an in-place write to it) counts as a difference.
    """
    if plan.prefix is None:
        return False
    known = _STAND_IN_HOLDS.setdefault(plan.resolved.model, {})
    if key not in known:
        with forward_attention(plan, sequences, length, attention, []) as real:
            expected = real.block_kwargs
        try:
            with forward_attention(
                plan, sequences, length, attention, [], embedding_stand_in=True
            ) as stood:
                got = stood.block_kwargs
        except (RuntimeError, ValueError, TypeError):  # e.g. an in-place write to the zeros
            known[key] = False
        else:
            known[key] = _same_values(expected, got)
    return known[key]


def _same_values(a: Any, b: Any) -> bool:
    """``a`` and ``b`` equal: tensors by shape, dtype and every value; tuples, lists and
    dicts elementwise; anything else by identity or ``==``.

    >>> _same_values({"x": (torch.ones(2), None)}, {"x": (torch.ones(2), None)})
    True
    >>> _same_values([torch.ones(2)], [torch.zeros(2)])
    False
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_values, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False
