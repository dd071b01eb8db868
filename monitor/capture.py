"""Keep a reference to the most recent training batch a model saw.

A forward pre-hook on the model stores references (no copies) to
``input_ids``, ``attention_mask`` and ``logits_to_keep`` of forwards that run
in training mode with autograd on, i.e. training steps, not evaluation or
generation. ``logits_to_keep = m`` (as TRL's GRPO passes it: completion length + 1)
means the trainer uses the logits of the last m positions only, so only those
are probed: in GRPO, exactly the positions that predict completion tokens.

>>> import torch
>>> model = torch.nn.Linear(3, 3)
>>> capture = BatchCapture(model)
>>> _ = model(torch.zeros(1, 3))          # no input_ids: nothing captured
>>> capture.latest is None
True
>>> capture.remove()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CapturedBatch:
    """References to one training forward's inputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    logits_to_keep: int | None  # the trainer uses only the last m positions' logits

    def target_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: positions whose next token is real (and whose logits are used)."""
        from inversion_monitor.sampling import valid_positions

        valid = valid_positions(self.input_ids, self.attention_mask)
        if self.logits_to_keep is not None:
            valid[:, : max(self.input_ids.shape[1] - self.logits_to_keep, 0)] = False
        return valid


class BatchCapture:
    """Installs the pre-hook on ``model``; ``latest`` is the last training batch."""

    def __init__(self, model: nn.Module) -> None:
        self.latest: CapturedBatch | None = None
        self.skipped_reason: str | None = None
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            self.skipped_reason = "the training forward passed no 2-D input_ids"
            return
        if input_ids.dtype != torch.long:
            self.skipped_reason = f"input_ids have dtype {input_ids.dtype}, not int64"
            return
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            mask = None
        keep = kwargs.get("logits_to_keep")
        last = int(keep) if isinstance(keep, int) and not isinstance(keep, bool) else 0
        self.latest = CapturedBatch(
            input_ids=input_ids, attention_mask=mask, logits_to_keep=last if last > 0 else None
        )

    def remove(self) -> None:
        """Remove the hook and drop the references."""
        self._handle.remove()
        self.latest = None
