"""Reuse the training forward's hidden states below the lowest probed block.

The probe re-runs every decoder block below the lowest block it measures,
but the training forward has just computed those hidden states. A
:class:`PrefixCapture` keeps a detached reference (no copy) to the input of
block ``layer`` in each training forward; a probe run before the optimizer
step starts from it (``logit_gradient_norms(..., prefix=capture.latest)``):
the blocks below are skipped and the model's own forward does everything
else (masks, rotary embeddings, final norm, head).

It is used only where it gives the numbers recomputing gives:

- the forward ran in training mode with autograd on (a training step), and
  every block below ``layer`` returned a plain tensor (transformers >= 5
  blocks do: the skipped blocks hand their input on unchanged). Under
  autocast the block's pre-hook records the autocast state
  (:class:`~inversion_monitor.probe.precision.ProbePrecision`, read inside
  the forward: HF and accelerate wrap the model's ``forward`` in autocast) and
  the probe runs the blocks above under the same autocast;
- nothing random was active below the block (dropout modules, attention
  dropout, MoE router jitter): the probe runs in eval mode;
- no block at or above ``layer`` reads keys and values of a skipped block
  (KV sharing);
- at probe time (:meth:`CapturedPrefix.refusal`): the probe's ``input_ids``
  are the very tensor of that forward, its attention mask and position ids
  equal that forward's, and no parameter changed since: no ``torch.optim``
  optimizer holding the model's parameters stepped (a global step pre-hook,
  held while the capture is installed: fused kernels such as
  ``AdamW(fused=True)`` update in place without bumping version counters;
  optimizers of other models do not count) and every parameter's version counter is
  unchanged (any other in-place update through autograd-visible ops; writes
  through ``.data`` are invisible to both, so probe before the weights change).

Otherwise the probe recomputes the prefix and says why
(:attr:`~inversion_monitor.probe.gradients.ProbeResult.prefix_reason`).

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("llama", num_layers=2).train()
>>> capture = PrefixCapture(model, layer=-1)
>>> ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))
>>> _ = model(input_ids=ids)
>>> capture.latest.layer, tuple(capture.latest.hidden.shape), capture.latest.precision.enabled
(1, (2, 8, 64), False)
>>> capture.latest.refusal(model, ids, None, None) is None
True
>>> capture.latest.refusal(model, ids.clone(), None, None)
"the probed input_ids are not the captured forward's tensor"
>>> torch.optim.AdamW(model.parameters(), fused=True).step()
>>> capture.latest is None, capture.skipped_reason
(True, 'an optimizer stepped since the training forward')
>>> capture.remove()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from inversion_monitor.probe.architectures import resolve_model
from inversion_monitor.probe.precision import ProbePrecision

__all__ = ["CapturedPrefix", "PrefixCapture"]

# attention modules keep their dropout probability as a float and apply it in training mode
_DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "attn_pdrop")
_JITTER_KEYS = ("router_jitter_noise", "jitter_noise")


class _Steps:
    """Counts optimizer steps while a capture is installed (``open`` until removed)."""

    def __init__(self) -> None:
        self.count = 0
        self.open = True


def parameter_versions(model: nn.Module) -> tuple[int, ...]:
    """Every parameter's version counter: any in-place update changes one."""
    return tuple(p._version for p in model.parameters())


@dataclass(frozen=True)
class CapturedPrefix:
    """The input ``[B, T, d]`` of decoder block ``layer`` in one training forward.

    Attributes:
        layer: the block index (non-negative).
        hidden: the block's incoming hidden states, detached (no copy).
        input_ids, attention_mask, position_ids: that forward's (references).
        versions: :func:`parameter_versions` of the model at that forward.
        steps: the capture's optimizer-step counter, and its value at that forward.
        precision: the autocast state the block ran under (the probe's forward runs
            under it).
    """

    layer: int
    hidden: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    versions: tuple[int, ...]
    steps: _Steps
    steps_at_capture: int
    precision: ProbePrecision

    def refusal(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> str | None:
        """None if a probe of these inputs may start from :attr:`hidden`, else why not."""
        if input_ids is not self.input_ids:
            return "the probed input_ids are not the captured forward's tensor"
        if not _same(attention_mask, self.attention_mask, input_ids):
            return "the probed attention_mask differs from the captured forward's"
        if not _same(position_ids, self.position_ids, input_ids):
            return "the probed position_ids differ from the captured forward's"
        if not self.steps.open:
            return "the capture was removed, so optimizer steps since are unknown"
        if self.steps.count != self.steps_at_capture:
            return _STEPPED
        if parameter_versions(model) != self.versions:
            return (
                "parameters changed since the training forward (probe before the optimizer "
                "step to reuse its hidden states)"
            )
        return None


_STEPPED = "an optimizer stepped since the training forward"


def _same(probed: torch.Tensor | None, captured: torch.Tensor | None, ids: torch.Tensor) -> bool:
    """Whether two optional ``[B, T]`` (or ``[1, T]``) tensors say the same."""
    if probed is None or captured is None:
        return probed is None and captured is None
    shape = ids.shape
    try:
        return bool(
            torch.equal(
                probed.to(captured.device).long().expand(shape),
                captured.long().expand(shape),
            )
        )
    except RuntimeError:  # shapes that do not broadcast to [B, T]
        return False


def _random_module(module: nn.Module) -> str | None:
    """Why a training-mode forward of ``module`` alone is random, or None."""
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return f"dropout is active ({type(module).__name__}, p={module.p})"
    for name in _DROPOUT_ATTRIBUTES:
        value = module.__dict__.get(name)
        if isinstance(value, float) and value > 0:
            return f"attention dropout is active ({type(module).__name__}.{name}={value})"
    return None


class PrefixCapture:
    """Keeps the latest training forward's input of decoder block ``layer``.

    Args:
        model: the model the trainer calls (wrappers allowed, as for the probe).
        layer: the block (negative from the end) whose input is kept: the
            lowest block the probe measures.

    :attr:`latest` is None when the last training forward could not be
    captured; :attr:`skipped_reason` then says why. :attr:`precision` is the
    autocast state of the latest training forward's block ``layer`` (captured
    or not; None before the first). :meth:`release` drops
    the reference once the weights change (after the optimizer step).
    """

    def __init__(self, model: nn.Module, layer: int) -> None:
        resolved = resolve_model(model)
        self.layer = resolved.layer_index(layer)
        self.latest: CapturedPrefix | None = None
        self.skipped_reason: str | None = "no training forward seen yet"
        self.precision: ProbePrecision | None = None
        self._params_of = resolved.model
        self._inputs: tuple[torch.Tensor, Any, Any] | None = None
        self._bad_output: str | None = None
        below = list(resolved.blocks[: self.layer])
        # modules whose training-mode randomness would reach the block's input: the
        # decoder's own (embedding dropout) and those of the blocks below
        above = {id(m) for b in resolved.blocks[self.layer :] for m in b.modules()}
        self._random = [m for m in resolved.decoder.modules() if id(m) not in above]
        self._static_reason = self._static_refusal(resolved.config, resolved.blocks[self.layer :])
        self._steps = _Steps()
        self._param_ids = {id(p) for p in resolved.model.parameters()}
        block = resolved.blocks[self.layer]
        self._handles = [
            model.register_forward_pre_hook(self._model_hook, with_kwargs=True),
            block.register_forward_pre_hook(self._block_hook, with_kwargs=True),
            *(b.register_forward_hook(self._below_hook) for b in below),
            register_optimizer_step_pre_hook(self._optimizer_step),
        ]

    def _optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """A ``torch.optim`` step on the model's parameters (fused kernels included) makes
        the capture stale."""
        groups = getattr(optimizer, "param_groups", [])
        if not any(id(p) in self._param_ids for group in groups for p in group["params"]):
            return
        self._steps.count += 1
        if self.latest is not None:
            self.latest = None
            self.skipped_reason = _STEPPED

    @staticmethod
    def _static_refusal(config: Any, above: Sequence[nn.Module]) -> str | None:
        for key in _JITTER_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, float) and value > 0:
                return f"the config sets {key}={value} (random routing in training)"
        for block in above:
            for module in block.modules():
                if getattr(module, "is_kv_shared_layer", False) is True:
                    return (
                        f"{type(module).__name__} reads keys and values of an earlier block "
                        "(KV sharing), which the probe would skip"
                    )
        return None

    def _model_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # not a training step: the last capture stays
        self.latest = None
        self._bad_output = None
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            self._inputs = None
            self.skipped_reason = "the training forward passed no 2-D input_ids"
            return
        self._inputs = (ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        self.skipped_reason = "the lowest probed block did not run in the training forward"

    def _below_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module.training and torch.is_grad_enabled() and not isinstance(output, torch.Tensor):
            self._bad_output = (
                f"{type(module).__name__} returns {type(output).__name__}, not the hidden "
                "states (the probe's skipped blocks hand their input on unchanged)"
            )

    def _block_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            self.precision = ProbePrecision.current(hidden.device.type)
        if self._inputs is None:
            return
        ids, mask, pos = self._inputs
        self._inputs = None
        reason = self._refusal(args, kwargs, ids)
        if reason is not None:
            self.skipped_reason = reason
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        assert self.precision is not None  # set above from this very tensor
        self.latest = CapturedPrefix(
            layer=self.layer,
            hidden=hidden.detach(),
            input_ids=ids,
            attention_mask=mask if isinstance(mask, torch.Tensor) else None,
            position_ids=pos if isinstance(pos, torch.Tensor) else None,
            versions=parameter_versions(self._params_of),
            steps=self._steps,
            steps_at_capture=self._steps.count,
            precision=self.precision,
        )
        self.skipped_reason = None

    def _refusal(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], ids: torch.Tensor
    ) -> str | None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.ndim != 3
            or tuple(hidden.shape[:2]) != tuple(ids.shape)
        ):
            return "the block's input is not [batch, seq_len, hidden] hidden states"
        if self._static_reason is not None:
            return self._static_reason
        if self._bad_output is not None:
            return self._bad_output
        for candidate in self._random:
            if candidate.training:
                reason = _random_module(candidate)
                if reason is not None:
                    return reason
        return None

    def release(self) -> None:
        """Drop the captured hidden states (the weights are about to change or changed)."""
        if self.latest is not None:
            self.latest = None
            self.skipped_reason = "released after the optimizer step"

    def remove(self) -> None:
        """Remove the hooks and drop the references."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._steps.open = False
        self.latest = None
        self._inputs = None
