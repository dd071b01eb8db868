"""Record the call a transformers attention module makes to its attention function.

transformers (>= 4.48) attention modules compute q, k, v (after their rotary
embedding, q/k norms, ...) and then call the function registered for
``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` (or the
module's own ``eager_attention_forward``) as
``fn(module, query, key, value, attention_mask, scaling=..., **kwargs)``.
That call holds everything the attention does that depends on positions:
post-RoPE queries and keys, the mask (padding, causality, sliding windows),
scaling, soft-caps and sinks. :func:`recording_attention` routes one module's
calls through a recorder (the module's own function still computes the
result), so the probe can re-use the model's attention exactly instead of
re-implementing it. The function computes from detached copies of q, k and v
(:attr:`AttentionCall.leaves`): a backward from the logits stops at them, so
it never runs the attention's own backward unless asked for their gradients,
and what reaches a projection's output through any other path (a gate on the
attention output computed from the query projection, say) is exactly what a
backward to that output gives.

Only ``"eager"`` and ``"sdpa"`` are supported (:data:`SUPPORTED_IMPLEMENTATIONS`);
anything else is refused by :func:`attention_function`, with the reason.

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("llama", num_layers=1)
>>> attention = model.model.layers[0].self_attn
>>> with recording_attention(attention) as recorder:
...     _ = model(input_ids=torch.tensor([[5, 6, 7]]))
>>> [tuple(recorder.calls[0].query.shape), tuple(recorder.calls[0].output.shape)]
[(1, 4, 3, 16), (1, 3, 4, 16)]
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")
_CAPTURE_KEY = "inversion_monitor_recording"
_RECORDER_ATTRIBUTE = "_inversion_monitor_recorder"

AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]


@dataclass
class AttentionCall:
    """One call of an attention function: its inputs and output, with autograd intact.

    ``query`` ``[B, H, T, d]``, ``key``/``value`` ``[B, H_kv, T, d]`` (post-RoPE,
    as the module passed them, with their graph back to the projections),
    ``output`` ``[B, T, H, d]``, computed from ``leaves``: detached copies of
    query, key and value (their gradients are ``dz/dq``, ``dz/dk``, ``dz/dv``).
    ``compute_dtype``: what the function computed in (the autocast dtype where
    autocast was on, else the query's); replays are checked to its tolerance.
    """

    function: AttentionFunction
    implementation: str
    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: dict[str, Any]
    output: torch.Tensor
    leaves: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    compute_dtype: torch.dtype

    def replay(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The same function, module and keyword arguments on other q, k, v and mask."""
        output, _ = self.function(self.module, query, key, value, attention_mask, **self.kwargs)
        return output

    def release_query_and_output(self) -> None:
        """Drop the query and output of every position once what needs them is done (the
        replays took the targets' rows): empty tensors of their dtype and device remain."""
        self.query = self.query.new_empty((0,))
        self.output = self.output.new_empty((0,))
        self.leaves = (self.leaves[0].new_empty((0,)), self.leaves[1], self.leaves[2])


class AttentionRecorded(Exception):
    """Raised right after the recorded call when :attr:`AttentionRecorder.stop` is set."""


@dataclass
class AttentionRecorder:
    """The calls recorded while :func:`recording_attention` was active.

    ``values_only``: calls whose ``(implementation, compute dtype, device type)`` is in it
    compute the function's output without its graph (no gradient to q, k, v is asked of
    them: nothing the function would save for its backward is held); ``stop``: raise
    :class:`AttentionRecorded` after the next call (the rest of the forward is not run).
    """

    function: AttentionFunction
    implementation: str
    calls: list[AttentionCall] = field(default_factory=list)
    substitute: torch.Tensor | None = None
    values_only: Collection[tuple[str, torch.dtype, str]] = ()
    stop: bool = False


def attention_module(block: nn.Module, inside: nn.Module) -> nn.Module:
    """The attention module of ``block``: the innermost module with a ``config`` holding ``inside``.

    >>> from inversion_monitor.toy.models import tiny_causal_lm
    >>> block = tiny_causal_lm("gpt2", num_layers=1).transformer.h[0]
    >>> type(attention_module(block, block.attn.c_attn)).__name__
    'GPT2Attention'
    """
    best: nn.Module | None = None
    for module in block.modules():
        if hasattr(module, "config") and any(m is inside for m in module.modules()):
            best = module  # modules() is depth first: later matches are deeper
    if best is None:
        raise LookupError(f"no module with a config around {type(inside).__name__}")
    return best


def attention_function(module: nn.Module) -> AttentionFunction | str:
    """The function ``module`` calls for attention, or the reason it cannot be used."""
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        return (
            f"attention implementation {implementation!r} (the last-block path replays "
            f"{' and '.join(SUPPORTED_IMPLEMENTATIONS)} only)"
        )
    if implementation == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function: Any = ALL_ATTENTION_FUNCTIONS["sdpa"]
    else:
        function = getattr(
            sys.modules.get(type(module).__module__), "eager_attention_forward", None
        )
    if not callable(function):
        return f"{type(module).__name__} has no {implementation} attention function"
    if implementation == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        return "GPT-2's reorder_and_upcast_attn replaces the attention function"
    checked: AttentionFunction = function
    return checked


def _recording_function(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    recorder: AttentionRecorder = getattr(module.config, _RECORDER_ATTRIBUTE)
    query, key, value, mask = (list(args) + [None] * 4)[:4]
    if len(args) > 4:
        raise TypeError("attention function called with more than 4 positional arguments")
    if len(args) < 4:  # keyword-passed tensors
        query = kwargs.pop("query", query)
        key = kwargs.pop("key", key)
        value = kwargs.pop("value", value)
        mask = kwargs.pop("attention_mask", mask)
    compute_dtype = _compute_dtype(query)
    graph = (recorder.implementation, compute_dtype, query.device.type) not in recorder.values_only
    q_leaf, k_leaf, v_leaf = (
        t.detach().requires_grad_(graph and t.is_floating_point()) for t in (query, key, value)
    )
    if recorder.substitute is None:
        with torch.set_grad_enabled(graph):
            output, weights = recorder.function(module, q_leaf, k_leaf, v_leaf, mask, **kwargs)
    else:  # the function's output given (what another forward computed), not computed
        output, weights = recorder.substitute, None
    recorder.calls.append(
        AttentionCall(
            function=recorder.function,
            implementation=recorder.implementation,
            module=module,
            query=query,
            key=key,
            value=value,
            attention_mask=mask,
            kwargs=dict(kwargs),
            output=output,
            leaves=(q_leaf, k_leaf, v_leaf),
            compute_dtype=compute_dtype,
        )
    )
    if recorder.stop:
        recorder.stop = False
        raise AttentionRecorded
    return output, weights


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype an attention function called now computes ``query`` in (autocast's
    lower precision where autocast is on and casts it)."""
    device = query.device.type
    if (
        query.is_floating_point()
        and torch.amp.is_autocast_available(device)
        and torch.is_autocast_enabled(device)
    ):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    if _CAPTURE_KEY not in AttentionInterface._global_mapping:
        AttentionInterface.register(_CAPTURE_KEY, _recording_function)


@contextmanager
def recording_attention(
    module: nn.Module,
    substitute: torch.Tensor | None = None,
    *,
    values_only: Collection[tuple[str, torch.dtype, str]] = (),
    stop: bool = False,
) -> Iterator[AttentionRecorder]:
    """Route ``module``'s attention-function calls through a recorder.

    Only this module instance is affected: it gets a copy of its config whose
    ``_attn_implementation`` names the recorder, which calls the original
    function (or, given ``substitute``, returns that as the function's output);
    ``values_only`` and ``stop`` as :class:`AttentionRecorder`'s. The config is put back
    on exit. Raises ``LookupError`` with the reason when
    the module's attention cannot be recorded.
    """
    function = attention_function(module)
    if isinstance(function, str):
        raise LookupError(function)
    _register()
    config: Any = module.config
    proxy = copy.copy(config)
    proxy._attn_implementation_internal = _CAPTURE_KEY  # bypasses the validating setter
    recorder = AttentionRecorder(
        function,
        str(config._attn_implementation),
        substitute=substitute,
        values_only=values_only,
        stop=stop,
    )
    setattr(proxy, _RECORDER_ATTRIBUTE, recorder)
    module.config = proxy
    try:
        yield recorder
    finally:
        module.config = config
