"""Keep a reference to the most recent training batch a model saw.

A forward pre-hook on the model stores references (no copies) to the inputs of
forwards that run in training mode *with autograd on*, i.e. training steps.
Both conditions matter: TRL's GRPO generates completions with the model still
in training mode (under ``torch.no_grad``), so the mode alone would capture
generation forwards.

Only the positions whose prediction the trainer actually scores are probed
(:meth:`CapturedBatch.target_mask`), read from the forward's own arguments:

- ``labels`` (Hugging Face convention: ``labels[b, t + 1]`` is the target of
  position t, ``-100`` = ignored): position t is probed only if its label is
  not ignored. This is how TRL 1.x marks the completion tokens: GRPO sets the
  prompt and padding labels to -100 and SFT does the same for prompts with
  ``completion_only_loss``.
- ``shift_labels`` (pre-shifted: ``shift_labels[b, t]`` is the target of t).
- ``logits_to_keep = m`` (an int): the trainer uses the logits of the last m
  positions only, so only those are probed (older TRL GRPO passed the
  completion length + 1).
- Padding-free / packed batches (``position_ids`` restarting between real
  tokens of a row, with or without an ``attention_mask``, as TRL's SFT
  ``packing`` or ``padding_free`` pass them): position t is probed only if
  t + 1 is in the same document, and :meth:`CapturedBatch.unpacked` gives one
  row per document (with its own ``position_ids``) for the probe, so
  documents never attend to each other.
- Multimodal batches (``pixel_values`` and the like) are not captured: the
  probe measures text-only batches.

>>> import torch
>>> model = torch.nn.Linear(3, 3)
>>> capture = BatchCapture(model)
>>> _ = model(torch.zeros(1, 3))          # no input_ids: nothing captured
>>> capture.latest is None
True
>>> capture.remove()
>>> ids = torch.tensor([[1, 5, 6, 7, 8]])
>>> labels = torch.tensor([[-100, -100, -100, 7, 8]])  # only 7 and 8 are trained on
>>> CapturedBatch(ids, None, labels=labels).target_mask()
tensor([[False, False,  True,  True, False]])
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inversion_monitor.probe.packing import document_index

IGNORE_INDEX = -100
"""The label value Hugging Face losses (and TRL) ignore."""

_MULTIMODAL_INPUTS = (
    "pixel_values",
    "pixel_values_videos",
    "image_embeds",
    "input_features",
    "input_values",
    "audio_values",
)


def _int_tensor_like(value: Any, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``value`` if it is an integer tensor of ``input_ids``'s shape, else None."""
    if (
        isinstance(value, torch.Tensor)
        and not value.is_floating_point()
        and value.dtype != torch.bool
        and value.shape == input_ids.shape
    ):
        return value
    return None


def _position_ids(value: Any, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``position_ids`` as ``[B, T]`` (a ``[1, T]`` one is broadcast), else None."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.is_floating_point():
        return None
    if value.shape[0] == 1 and value.shape[1] == input_ids.shape[1]:
        value = value.expand(input_ids.shape[0], -1)
    return value if value.shape == input_ids.shape else None


@dataclass(frozen=True)
class CapturedBatch:
    """References to one training forward's inputs.

    Attributes:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens, or None.
        logits_to_keep: the trainer uses only the last m positions' logits.
        labels: ``[B, T]`` HF-style labels (target of t at t + 1, -100 ignored).
        shift_labels: ``[B, T]`` pre-shifted labels (target of t at t).
        position_ids: ``[B, T]``; restarts between real tokens mark packed
            documents (see :mod:`inversion_monitor.probe.packing`).
        scored: ``[B, T]`` bool, positions to keep (set by :meth:`unpacked`).
        kv_cache: the training forward kept a KV cache (``use_cache``, else the
            model config's, or ``past_key_values``).
        varlen: the training forward passed ``cu_seq_lens_q``/``cu_seq_lens_k``.
        explicit_mask: a 4-D ``attention_mask`` the training forward passed.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    logits_to_keep: int | None = None
    labels: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    scored: torch.Tensor | None = None
    kv_cache: bool = False
    varlen: bool = False
    explicit_mask: torch.Tensor | None = None

    def _documents(self) -> torch.Tensor | None:
        """``[B, T]`` document index within each row when packed, else None."""
        return document_index(self.position_ids, self.attention_mask)

    @property
    def packed(self) -> bool:
        """Whether some row holds several documents (padding-free / packing)."""
        return self._documents() is not None

    def target_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: positions whose next token is real and scored by the trainer."""
        from inversion_monitor.probe.sampling import valid_positions

        valid = valid_positions(self.input_ids, self.attention_mask)
        if self.logits_to_keep is not None:
            valid[:, : max(self.input_ids.shape[1] - self.logits_to_keep, 0)] = False
        if self.labels is not None:
            valid[:, :-1] &= self.labels[:, 1:].to(valid.device) != IGNORE_INDEX
        if self.shift_labels is not None:
            valid &= self.shift_labels.to(valid.device) != IGNORE_INDEX
        documents = self._documents()
        if documents is not None:
            valid[:, :-1] &= (documents[:, 1:] == documents[:, :-1]).to(valid.device)
        if self.scored is not None:
            valid &= self.scored.to(valid.device)
        return valid

    def unpacked(self) -> CapturedBatch:
        """This batch with one right-padded row per packed document (self if not packed).

        Documents without a target are dropped; each keeps its own
        ``position_ids``. The result holds copies: ``[documents, longest]``
        ids, mask, position ids, and ``scored``.
        """
        documents = self._documents()
        if documents is None:
            return self
        assert self.position_ids is not None
        targets = self.target_mask()
        pieces: list[tuple[int, int, int]] = []  # (row, start, end)
        for row in range(self.input_ids.shape[0]):
            changes = torch.nonzero(documents[row, 1:] != documents[row, :-1]).flatten() + 1
            bounds = [0, *changes.tolist(), int(self.input_ids.shape[1])]
            for start, end in itertools.pairwise(bounds):
                if bool(targets[row, start:end].any()):
                    pieces.append((row, start, end))
        longest = max((end - start for _, start, end in pieces), default=2)
        shape = (len(pieces), longest)
        device = self.input_ids.device
        ids = torch.zeros(shape, dtype=self.input_ids.dtype, device=device)
        mask = torch.zeros(shape, dtype=torch.long, device=device)
        pos = torch.zeros(shape, dtype=torch.long, device=device)
        scored = torch.zeros(shape, dtype=torch.bool, device=device)
        for index, (row, start, end) in enumerate(pieces):
            ids[index, : end - start] = self.input_ids[row, start:end]
            mask[index, : end - start] = (
                1
                if self.attention_mask is None
                else self.attention_mask[row, start:end].to(device=device, dtype=torch.long)
            )
            pos[index, : end - start] = self.position_ids[row, start:end].to(device)
            scored[index, : end - start] = targets[row, start:end]
        return CapturedBatch(input_ids=ids, attention_mask=mask, position_ids=pos, scored=scored)


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
        media = [k for k in _MULTIMODAL_INPUTS if kwargs.get(k) is not None]
        if media:
            self.latest = None
            self.skipped_reason = (
                f"the training forward passed {media[0]}: the probe measures text-only batches"
            )
            return
        mask = kwargs.get("attention_mask")
        explicit = mask if isinstance(mask, torch.Tensor) and mask.ndim == 4 else None
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            mask = None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # transformers falls back on the config's
            use_cache = getattr(getattr(module, "config", None), "use_cache", False)
        keep = kwargs.get("logits_to_keep")
        last = int(keep) if isinstance(keep, int) and not isinstance(keep, bool) else 0
        self.latest = CapturedBatch(
            input_ids=input_ids,
            attention_mask=mask,
            logits_to_keep=last if last > 0 else None,
            labels=_int_tensor_like(kwargs.get("labels"), input_ids),
            shift_labels=_int_tensor_like(kwargs.get("shift_labels"), input_ids),
            position_ids=_position_ids(kwargs.get("position_ids"), input_ids),
            kv_cache=bool(use_cache) or kwargs.get("past_key_values") is not None,
            varlen=kwargs.get("cu_seq_lens_q") is not None,
            explicit_mask=explicit,
        )

    def remove(self) -> None:
        """Remove the hook and drop the references."""
        self._handle.remove()
        self.latest = None
