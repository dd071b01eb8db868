"""One probe forward: the hooks around the model's own forward, and the plan it works from.

:class:`ProbePlan` holds everything one call of
:func:`~inversion_monitor.probe.gradients.logit_gradient_norms` works from
(the rows, the targets, the hooked projections, the buffers it fills);
:meth:`ProbePlan.forward` runs the model's own forward on some of its rows,
cut after a length, with:

- forward hooks keeping each hooked projection's input and output;
- a pre-hook on the output embedding so the head sees only the target rows
  (the model's own post-processing then applies to exactly those logits);
- autograd off until the lowest probed block, whose incoming hidden state
  becomes a fresh leaf (nothing below it is recorded);
- where a captured prefix is usable, the blocks below it skipped and that
  block fed the training forward's hidden states.

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> from inversion_monitor.probe.architectures import resolve_model
>>> resolved = resolve_model(tiny_causal_lm("llama", num_layers=2))
>>> ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))
>>> targets = torch.tensor([[0, 3], [1, 5]])
>>> sites = projection_sites(resolved, [1], ["v"])
>>> plan = ProbePlan.for_targets(resolved, ids, targets, sites)
>>> with plan.forward(torch.tensor([0, 1]), 6, torch.tensor([0, 1]), targets[:, 1]) as out:
...     out.entropy.shape, out.target_logits.shape, len(out.inputs)
(torch.Size([2]), torch.Size([2]), 1)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from inversion_monitor.metrics.entropy import token_entropy
from inversion_monitor.metrics.norms import Norm
from inversion_monitor.probe.architectures import ResolvedModel, rank_one_exact
from inversion_monitor.probe.precision import ProbePrecision
from inversion_monitor.probe.prefix_capture import CapturedPrefix

Component = tuple[int, str]
"""(layer, projection name)."""
Site = tuple[nn.Module, torch.Tensor | None]
"""(the projection's module, the output columns that are its own; None: all)."""


class _Captures:
    """Forward hooks that keep each hooked module's input and output of one forward."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module in self.outputs:
            raise NotImplementedError(
                f"{type(module).__name__} ran twice in one forward (a shared or looped "
                "projection): the probe measures projections applied once per forward; "
                "probe other layers or projections"
            )
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RuntimeError(f"{type(module).__name__}'s output is not a differentiable tensor")
        x = args[0].detach()
        if (
            x.is_floating_point()
            and output.dtype != x.dtype
            and torch.is_autocast_enabled(x.device.type)
            and output.dtype == torch.get_autocast_dtype(x.device.type)
        ):  # autocast: the projection multiplied the input cast to its compute dtype
            x = x.to(output.dtype)
        self.inputs[module] = x
        self.outputs[module] = output

    def stop(self) -> None:
        """Stop capturing (what was captured stays until :meth:`remove`)."""
        for handle in self._handles:
            handle.remove()

    def remove(self) -> None:
        self.stop()
        self.inputs.clear()
        self.outputs.clear()


class _HeadRows:
    """Pre-hook on the output embedding: the model's head sees only the target rows.

    The model then applies its own post-processing (scaling, soft-capping,
    multipliers) to ``[1, K, V]`` logits, so they are exactly the model's.
    """

    def __init__(
        self, head: nn.Module, shape: tuple[int, int], rows: torch.Tensor, t: torch.Tensor
    ):
        self.calls = 0
        self._shape, self._rows, self._t = shape, rows, t
        self._handle = head.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.calls += 1
        if self.calls > 1:
            raise NotImplementedError(
                f"the model applies its output embedding ({type(module).__name__}) more than "
                "once per forward (e.g. extra prediction heads), so the probe cannot tell which "
                "application gives the next-token logits; probe a model whose forward applies "
                "it once"
            )
        hidden = args[0] if args else kwargs.get("input")
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.ndim != 3
            or tuple(hidden.shape[:2]) != self._shape
        ):
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise NotImplementedError(
                f"the model's output embedding received {got}, not one hidden state per input "
                f"token {self._shape}: the probe cannot tell which logits belong to which token; "
                "register an adapter whose model applies the head to every position, or probe "
                "the plain causal LM"
            )
        selected = hidden[self._rows, self._t].unsqueeze(0)
        if args:
            return (selected, *args[1:]), kwargs
        return args, {**kwargs, "input": selected}

    def remove(self) -> None:
        self._handle.remove()


class _GradFrom:
    """Run the forward without autograd until ``block``, then with it.

    The block's incoming hidden state becomes a fresh leaf (:attr:`leaf`), so
    the graph starts there; nothing below it is recorded. Works even when no
    parameter requires grad. The pre-hook runs before any hook a sharding
    framework put on the block, so the framework sees the leaf as the block's
    input and its backward hooks (FSDP2 reshard, ZeRO-3 release) complete when
    the backward reaches the leaf.
    """

    def __init__(self, block: nn.Module, *, grad: bool = True) -> None:
        self.leaf: torch.Tensor | None = None
        self._block = block
        self._grad = grad  # False: values only, the leaf a plain detached tensor

    def _pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        torch.set_grad_enabled(self._grad)
        if args and isinstance(args[0], torch.Tensor):
            self.leaf = args[0].detach().requires_grad_(self._grad)
            args = (self.leaf, *args[1:])
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            self.leaf = kwargs["hidden_states"].detach().requires_grad_(self._grad)
            kwargs["hidden_states"] = self.leaf
        else:
            raise RuntimeError(f"cannot find the hidden states entering {type(module).__name__}")
        return args, kwargs

    @contextmanager
    def active(self) -> Iterator[None]:
        handle = self._block.register_forward_pre_hook(
            self._pre_hook, with_kwargs=True, prepend=True
        )
        try:
            with torch.no_grad():  # restores the caller's grad mode on exit
                yield
        finally:
            handle.remove()


_Prefix = tuple[int, torch.Tensor]
"""(block, the hidden states entering it for the rows of one forward)."""


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _fed_from(resolved: ResolvedModel, prefix: _Prefix | None) -> Iterator[None]:
    """Skip the blocks below ``prefix[0]`` and feed that block ``prefix[1]`` (None: nothing).

    The skipped blocks hand their input on unchanged (their output is
    replaced at the next block anyway); the substitution is a pre-hook put
    first, so :class:`_GradFrom` on the same block makes the leaf from it.
    """
    if prefix is None:
        yield
        return
    layer, hidden = prefix

    def feed(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        incoming = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(incoming, torch.Tensor) or incoming.shape != hidden.shape:
            got = tuple(incoming.shape) if isinstance(incoming, torch.Tensor) else incoming
            raise RuntimeError(
                f"block {layer} received {got} where the captured prefix has {tuple(hidden.shape)}"
            )
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    skipped = list(resolved.blocks[:layer])
    saved = [block.__dict__.get("forward") for block in skipped]
    handle = resolved.blocks[layer].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
    try:
        for block in skipped:
            block.forward = _passthrough
        yield
    finally:
        handle.remove()
        for block, forward in zip(skipped, saved, strict=True):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise NotImplementedError(
            f"the model's forward returned {type(output).__name__} without logits"
        )
    return logits


@dataclass(frozen=True)
class ForwardPass:
    """One forward's results: entropy ``[n]`` and differentiable target logit ``[n]`` per
    target, each hooked module's input and output, and the leaf the graph starts at.

    ``inputs`` and ``outputs`` are emptied when the forward's context exits.
    """

    entropy: torch.Tensor
    target_logits: torch.Tensor
    inputs: Mapping[nn.Module, torch.Tensor]
    outputs: Mapping[nn.Module, torch.Tensor]
    leaf: torch.Tensor


def _run_forward(
    resolved: ResolvedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    lowest_block: int,
    captures: _Captures,
    rows: torch.Tensor,
    t: torch.Tensor,
    tokens: torch.Tensor,
    prefix: _Prefix | None,
    precision: ProbePrecision | None,
    grad: bool = True,
) -> ForwardPass:
    """The model's own forward of ``input_ids``; entropy and target logit at each (row, t).

    ``prefix``: the blocks below ``prefix[0]`` are skipped and that block starts
    from ``prefix[1]`` (the training forward's hidden states of these rows).
    ``precision``: the autocast the model's forward runs under (None: as the caller's).
    ``grad``: False runs it values only (no graph: nothing is kept for a backward).
    """
    head = _HeadRows(resolved.head, (input_ids.shape[0], input_ids.shape[1]), rows, t)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    start = _GradFrom(resolved.blocks[lowest_block], grad=grad)
    try:
        autocast = nullcontext() if precision is None else precision.forward_context()
        with start.active(), _fed_from(resolved, prefix):  # feeding first, then the leaf
            with autocast:
                out = resolved.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
                )
            if head.calls != 1:
                raise NotImplementedError(
                    f"the forward of {type(resolved.model).__name__} never called its output "
                    f"embedding ({type(resolved.head).__name__}, from get_output_embeddings()): "
                    "the probe reads the logits where the model computes them; make "
                    "get_output_embeddings() return the module the forward uses"
                )
            logits = _logits(out)
            if tuple(logits.shape[:2]) != (1, rows.shape[0]):
                raise NotImplementedError(
                    f"the model turned {rows.shape[0]} head rows into logits of shape "
                    f"{tuple(logits.shape)}: the probe cannot match logits to tokens; probe "
                    "the plain causal LM (logits [batch, tokens, vocab])"
                )
            logits = logits[0]
            entropy = token_entropy(logits.detach())
            z = logits.gather(1, tokens[:, None].to(logits.device))[:, 0].float()
        if start.leaf is None:
            raise RuntimeError("the lowest probed block did not run in the model's forward")
    finally:
        head.remove()
    return ForwardPass(
        entropy=entropy,
        target_logits=z,
        inputs=captures.inputs,
        outputs=captures.outputs,
        leaf=start.leaf,
    )


def projection_sites(
    resolved: ResolvedModel, layers: Sequence[int], projections: Sequence[str]
) -> dict[Component, Site]:
    """Every requested (layer, projection)'s site; refused per layer, with the reason."""
    sites: dict[Component, Site] = {}
    for layer in layers:
        for proj in projections:
            site = resolved.site(layer, proj)
            sites[(layer, proj)] = (site.module, site.columns)
    return sites


@dataclass
class ProbePlan:
    """Everything one probe call works from, and the buffers it fills.

    Build it with :meth:`for_targets`; :meth:`forward` runs the model on some
    of its rows.

    Attributes:
        resolved: the model, resolved.
        input_ids, attention_mask, position_ids: the rows probed (one per
            packed document where rows were packed).
        targets: ``[N, 2]`` (row, t), each once.
        tokens: ``[N]`` the target tokens ``input_ids[row, t + 1]``.
        sites: the hooked projections by component.
        rank_one: the components whose gradient is rank one (``g_t x_t^T``).
        lowest_block: the lowest probed block (autograd starts there).
        norm: which norm.
        norms, entropy: the ``[N]`` buffers the probe fills.
        prefix: the training forward's hidden states, checked usable for
            these rows (None: recompute from the embeddings).
        precision: the autocast the model's forward runs under (None: as the caller's).
    """

    resolved: ResolvedModel
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    targets: torch.Tensor
    tokens: torch.Tensor
    sites: dict[Component, Site]
    rank_one: set[Component]
    lowest_block: int
    norm: Norm
    norms: dict[Component, torch.Tensor]
    entropy: torch.Tensor
    prefix: CapturedPrefix | None = None
    precision: ProbePrecision | None = None

    @classmethod
    def for_targets(
        cls,
        resolved: ResolvedModel,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        sites: dict[Component, Site],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        norm: Norm = "nuclear",
        prefix: CapturedPrefix | None = None,
        precision: ProbePrecision | None = None,
    ) -> ProbePlan:
        """A plan measuring ``sites`` at ``targets`` (each once), with zeroed buffers."""
        device = input_ids.device
        count = targets.shape[0]
        rank_one = {c for c in sites if c[1] in ("q", "o") and rank_one_exact(resolved, c[0])}
        return cls(
            resolved=resolved,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            targets=targets,
            tokens=input_ids[targets[:, 0], targets[:, 1] + 1],
            sites=sites,
            rank_one=rank_one,
            lowest_block=min(c[0] for c in sites),
            norm=norm,
            norms={c: torch.zeros(count, dtype=torch.float32, device=device) for c in sites},
            entropy=torch.zeros(count, dtype=torch.float32, device=device),
            prefix=prefix,
            precision=precision,
        )

    @property
    def modules(self) -> list[nn.Module]:
        """The hooked modules, each once (fused Q/K/V share one)."""
        unique: dict[int, nn.Module] = {}
        for module, _ in self.sites.values():
            unique.setdefault(id(module), module)
        return list(unique.values())

    def outputs(self, forward: ForwardPass) -> list[torch.Tensor]:
        """The output of every hooked module in ``forward``, in :attr:`modules` order."""
        for component, (module, _) in self.sites.items():
            if module not in forward.outputs:
                raise NotImplementedError(
                    f"layer {component[0]} {component[1]!r}: the model's forward never called "
                    f"{type(module).__name__}, so its weight has no gradient to measure there; "
                    "probe other layers or projections"
                )
        return [forward.outputs[m] for m in self.modules]

    def gradients(self, forward: ForwardPass) -> dict[int, torch.Tensor]:
        """d(sum of target logits)/d(output) of every hooked module, by module id."""
        modules = self.modules
        outputs = self.outputs(forward)
        # down to the leaf, so every module above it finishes its backward (and any
        # sharding framework's backward hooks release what they gathered)
        grads = torch.autograd.grad(
            forward.target_logits.sum(), [*outputs, forward.leaf], allow_unused=True
        )
        return dict(zip((id(m) for m in modules), grads[:-1], strict=True))

    def row_range(self, start: int, stop: int) -> ProbePlan:
        """This plan on its rows ``[start, stop)`` (row ``start`` becomes row 0): views of
        its ids, mask, position ids and prefix (no copy of the prefix). The targets and the
        buffers stay this plan's: a probe of the range passes its own."""
        count = self.input_ids.shape[0]

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[start:stop] if tensor.shape[0] == count else tensor

        prefix = self.prefix
        if prefix is not None:
            prefix = replace(prefix, hidden=rows(prefix.hidden))
        return replace(
            self,
            input_ids=rows(self.input_ids),
            attention_mask=None if self.attention_mask is None else rows(self.attention_mask),
            position_ids=None if self.position_ids is None else rows(self.position_ids),
            prefix=prefix,
        )

    def cut(
        self, sequences: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, _Prefix | None]:
        """ids, mask, position ids and captured prefix (None: recompute) of ``sequences``
        (sorted unique rows, as ``torch.unique`` gives), cut to their first ``length``
        tokens: views where ``sequences`` are every row (no copy of the prefix)."""
        every = sequences.numel() == self.input_ids.shape[0]

        def cut(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[:, :length] if every else tensor[sequences.to(tensor.device), :length]

        mask = None if self.attention_mask is None else cut(self.attention_mask)
        pos = None if self.position_ids is None else cut(self.position_ids)
        prefix = None if self.prefix is None else (self.prefix.layer, cut(self.prefix.hidden))
        return cut(self.input_ids), mask, pos, prefix

    @contextmanager
    def forward(
        self,
        sequences: torch.Tensor,
        length: int,
        rows: torch.Tensor,
        t: torch.Tensor,
        *,
        grad: bool = True,
    ) -> Iterator[ForwardPass]:
        """The model's own forward of rows ``sequences`` cut to ``length`` tokens, with one
        entry per target (forward row ``rows[k]``, position ``t[k]``); the hooks' captures
        are released on exit. ``grad=False``: values only (no graph, no captures)."""
        ids, mask, pos, prefix = self.cut(sequences, length)
        captures = _Captures(self.modules if grad else [])
        try:
            yield _run_forward(
                self.resolved,
                ids,
                attention_mask=mask,
                position_ids=pos,
                lowest_block=self.lowest_block,
                captures=captures,
                rows=rows,
                t=t,
                tokens=self.input_ids[sequences[rows], t + 1],
                prefix=prefix,
                precision=self.precision,
                grad=grad,
            )
        finally:
            captures.remove()
