"""CorR-PO building blocks: per-sequence inversion, reward shaping, group advantages.

Correlation-Regularized Policy Optimization (science.md section 3) shapes each
completion's reward with its own inversion statistic before GRPO's group
normalisation:

1. :func:`sequence_inversion`: rho_i of completion i, the correlation between
   entropy and logit-gradient strength over that completion's tokens, from one
   extra probe (forward and backward) for the whole batch.
2. :func:`corrpo_rewards`: ``r~_i = r_i - coef * rho_i`` (a more negative rho
   earns more); completions with too few tokens, or whose task reward fails
   the gate, are left unshaped (rho treated as 0).
3. :func:`group_advantages`: ``(r~_i - mean) / (std + eps)`` per group of
   ``group_size`` consecutive completions, as GRPO does.

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("llama", num_layers=2)
>>> ids = torch.randint(4, 100, (4, 20), generator=torch.Generator().manual_seed(0))
>>> completion = torch.zeros_like(ids, dtype=torch.bool)
>>> completion[:, 8:] = True                        # tokens 8.. are the completions
>>> inv = sequence_inversion(model, ids, completion_mask=completion)
>>> inv.n.tolist(), bool(inv.valid.all())
([12, 12, 12, 12], True)
>>> shaped = corrpo_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), inv.rho, coef=0.1)
>>> torch.allclose(shaped, torch.tensor([1.0, 0.0, 1.0, 0.0]) - 0.1 * inv.rho.float())
True
>>> [round(a, 4) for a in group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2).tolist()]
[0.707, -0.707, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from inversion_monitor._checks import check_choice, check_int, check_mask, check_tensor
from inversion_monitor.metrics.stats import inversion_stats
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.sampling import valid_positions

__all__ = ["SequenceInversion", "corrpo_rewards", "group_advantages", "sequence_inversion"]

Scale = Literal["group", "batch", "none"]
DEFAULT_PROJECTIONS: tuple[str, ...] = ("q", "o")
"""Last-block Q and O: the probe's rank-one fast path, one forward and backward per batch."""


@dataclass(frozen=True)
class SequenceInversion:
    """Per-sequence inversion of one batch.

    Attributes:
        rho: ``[B]`` float64 correlation per sequence (NaN where not ``valid``).
        n: ``[B]`` number of completion tokens measured per sequence.
        valid: ``[B]`` bool, enough tokens (``n >= min_tokens``) and non-degenerate.
        method: ``"spearman"`` or ``"pearson"``.

    >>> s = SequenceInversion(torch.tensor([-0.5, float("nan")], dtype=torch.float64),
    ...                       torch.tensor([10, 2]), torch.tensor([True, False]), "spearman")
    >>> s.n_unshaped
    1
    """

    rho: Tensor
    n: Tensor
    valid: Tensor
    method: str

    @property
    def n_unshaped(self) -> int:
        """How many sequences have no usable rho."""
        return int((~self.valid).sum())


def _target_mask(
    input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor | None
) -> Tensor:
    """``[B, T]`` bool: positions t whose next token t + 1 is a real completion token."""
    targets = valid_positions(input_ids, attention_mask)
    if completion_mask is not None:
        completion = check_mask(completion_mask, "completion_mask")
        if tuple(completion.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"completion_mask: expected the shape of input_ids {tuple(input_ids.shape)} "
                f"(1 on completion tokens), got {tuple(completion.shape)}"
            )
        targets[:, :-1] &= completion[:, 1:].to(targets.device)
    return targets


def sequence_inversion(
    model: nn.Module,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    completion_mask: Tensor | None = None,
    method: Literal["spearman", "pearson"] = "spearman",
    layers: Sequence[int] | None = None,
    projections: Sequence[str] | None = None,
    min_tokens: int = 8,
) -> SequenceInversion:
    """rho and token count of each sequence, over its completion tokens.

    A target is a position t whose next token ``input_ids[b, t + 1]`` is a real
    completion token (``completion_mask[b, t + 1]`` and the attention mask at t
    and t + 1); without ``completion_mask`` every real next token counts. One
    call of :func:`~inversion_monitor.logit_gradient_norms` measures all
    targets of the batch, then :func:`~inversion_monitor.inversion_stats` runs
    per sequence.

    Args:
        model: the policy (a Hugging Face causal LM).
        input_ids: ``[B, T]`` prompt + completion ids, as the trainer holds them.
        attention_mask: ``[B, T]`` 1 for real tokens (left or right padding).
        completion_mask: ``[B, T]`` 1 on completion tokens.
        method: ``"spearman"`` (default) or ``"pearson"``.
        layers: decoder blocks; default the last one.
        projections: default ``("q", "o")``, the last-block fast path (one
            forward and one backward for the batch); other choices cost one
            row per token (see :mod:`inversion_monitor.probe.gradients`).
        min_tokens: fewest completion tokens for a rho (at least 4).

    Returns:
        A :class:`SequenceInversion`; sequences with fewer than ``min_tokens``
        targets or constant values have ``valid=False`` and NaN rho.
    """
    check_choice(method, "method", ("spearman", "pearson"))
    min_tokens = check_int(min_tokens, "min_tokens", minimum=4)
    if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.long or input_ids.ndim != 2:
        raise TypeError("input_ids: expected a LongTensor [batch, seq_len]")
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask")
    targets = _target_mask(input_ids, attention_mask, completion_mask)
    positions = targets.nonzero()
    batch = input_ids.shape[0]
    result = logit_gradient_norms(
        model,
        input_ids,
        attention_mask=attention_mask,
        positions=positions,
        layers=layers,
        projections=tuple(projections) if projections is not None else DEFAULT_PROJECTIONS,
    )
    rho = torch.full((batch,), math.nan, dtype=torch.float64)
    n = torch.zeros(batch, dtype=torch.long)
    valid = torch.zeros(batch, dtype=torch.bool)
    rows = result.positions[:, 0].cpu()
    entropy, score = result.entropy.detach().cpu(), result.score.detach().cpu()
    for b in range(batch):
        mine = rows == b
        count = int(mine.sum())
        n[b] = count
        if count < min_tokens:
            continue
        stats = inversion_stats(entropy[mine], score[mine], method=method, min_tokens=min_tokens)
        if not stats.insufficient:
            rho[b] = stats.rho
            valid[b] = True
    return SequenceInversion(rho=rho, n=n, valid=valid, method=method)


def _check_vector(value: object, name: str) -> Tensor:
    t = check_tensor(value, name)
    if t.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D tensor (one value per completion), got {t.ndim}-D"
        )
    return t


def corrpo_rewards(
    rewards: Tensor,
    rho: Tensor,
    *,
    coef: float,
    gate_threshold: float | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Shaped rewards ``rewards - coef * rho``, unshaped where rho is unusable or gated.

    A completion is shaped only when its rho is finite, ``valid`` (if given) is
    True, and (if ``gate_threshold`` is set) its task reward is
    ``>= gate_threshold``. Others keep their reward (rho treated as 0).

    Args:
        rewards: ``[N]`` task rewards (floating).
        rho: ``[N]`` per-completion rho (e.g. :attr:`SequenceInversion.rho`).
        coef: lambda >= 0 (0.05-0.1 for rewards in [0, 1]).
        gate_threshold: shape only completions whose reward passes it.
        valid: ``[N]`` bool, e.g. :attr:`SequenceInversion.valid`.

    Returns:
        ``[N]`` shaped rewards, dtype and device of ``rewards``.

    >>> corrpo_rewards(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([-0.5, -0.5, float("nan")]),
    ...                coef=0.1, gate_threshold=0.5)
    tensor([1.0500, 0.0000, 1.0000])
    """
    r = _check_vector(rewards, "rewards")
    if not r.is_floating_point():
        raise TypeError(f"rewards: expected a floating tensor, got {r.dtype}")
    p = _check_vector(rho, "rho")
    if p.shape != r.shape:
        raise ValueError(
            f"rho: expected shape {tuple(r.shape)} (one per reward), got {tuple(p.shape)}"
        )
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
        raise TypeError(f"coef: expected a finite number, got {coef!r}")
    if coef < 0:
        raise ValueError(
            f"coef: expected >= 0 (a negative lambda rewards weaker inversion), got {coef}"
        )
    if gate_threshold is not None and (
        isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float))
    ):
        raise TypeError(f"gate_threshold: expected a number or None, got {gate_threshold!r}")
    p = p.to(device=r.device, dtype=torch.float64)
    shape = torch.isfinite(p)
    if valid is not None:
        v = check_mask(valid, "valid")
        if v.shape != r.shape:
            raise ValueError(f"valid: expected shape {tuple(r.shape)}, got {tuple(v.shape)}")
        shape &= v.to(r.device)
    if gate_threshold is not None:
        shape &= r >= gate_threshold
    shaping = torch.where(shape, -float(coef) * p, torch.zeros_like(p))
    return (r.to(torch.float64) + shaping).to(r.dtype)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: Scale = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO advantages: reward minus its group mean, over a std.

    Groups are ``group_size`` consecutive entries. ``scale="group"`` divides
    by each group's std (unbiased, as TRL), ``"batch"`` by the whole batch's,
    ``"none"`` not at all; ``eps`` is added to the std. A group whose rewards
    are all equal gets zeros, never NaN.

    >>> group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), 2, scale="none").tolist()
    [0.0, 0.0, -1.0, 1.0]
    """
    r = _check_vector(rewards, "rewards")
    if not r.is_floating_point():
        raise TypeError(f"rewards: expected a floating tensor, got {r.dtype}")
    group_size = check_int(group_size, "group_size", minimum=1)
    if r.numel() % group_size:
        raise ValueError(
            f"rewards: {r.numel()} values are not a whole number of groups of "
            f"group_size={group_size}"
        )
    check_choice(scale, "scale", ("group", "batch", "none"))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    grouped = r.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = (
            grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)
            if group_size > 1
            else torch.zeros_like(r)
        )
    else:
        std = r.std().expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    return centred / (std + eps)
