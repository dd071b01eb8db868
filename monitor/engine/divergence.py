"""A probe that fails on a diverged model says so.

A run whose weights took a NaN or an infinity (a NaN batch, an overflowing
update) gives the probe non-finite Gram matrices, and its eigensolver then
fails with "the input matrix is ill-conditioned": true, and no help to the
person reading the warning. On a failed probe (never on the hot path: the
check costs a host sync) the engine looks at the model's own weights and,
where they hold NaN or inf, raises :class:`DivergedModelError` naming them in
place of the solver's error, which stays attached as its cause.

>>> import torch
>>> layer = torch.nn.Linear(2, 2)
>>> nonfinite_parameters(layer)
([], 0)
>>> with torch.no_grad():
...     layer.bias[1] = float("nan")
>>> nonfinite_parameters(layer)
(['bias'], 1)
>>> error = explain_probe_failure(layer, 7, ValueError("eigh failed"))
>>> type(error).__name__, str(error)[:53]
('DivergedModelError', "the model's weights hold NaN or inf at step 7 (bias):")
>>> str(error).endswith("(the probe's own error: ValueError: eigh failed)")
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DivergedModelError", "explain_probe_failure", "nonfinite_parameters"]


class DivergedModelError(RuntimeError):
    """The probe failed on a model whose weights hold NaN or inf (the run diverged)."""


def _local(param: Any) -> torch.Tensor:
    """The values of ``param`` this rank holds: a ZeRO-3 partition, an FSDP2 shard, or all."""
    partition = getattr(param, "ds_tensor", None)
    if isinstance(partition, torch.Tensor):
        return partition
    to_local = getattr(param, "to_local", None)
    if callable(to_local):
        local: torch.Tensor = to_local()
        return local
    tensor: torch.Tensor = param
    return tensor


def _finite(tensor: torch.Tensor) -> torch.Tensor:
    """Whether every value is finite, as a 0-d tensor: NaN carries through min and max and an
    infinity is one of them, so no temporary of the tensor's size (an embedding's mask)."""
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def nonfinite_parameters(model: nn.Module, limit: int = 3) -> tuple[list[str], int]:
    """The names of the first ``limit`` floating-point parameters holding NaN or inf on this
    rank (its shards), and how many do. One host sync per device: for a failure path only."""
    named = [(name, _local(p).detach()) for name, p in model.named_parameters()]
    named = [(name, t) for name, t in named if t.is_floating_point() and t.numel() > 0]
    if not named:
        return [], 0
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad: set[int] = set()
    with torch.no_grad():
        for indices in by_device.values():  # one host sync per device
            flags = torch.stack([_finite(named[i][1]) for i in indices])
            bad.update(i for i, ok in zip(indices, flags.tolist(), strict=True) if not ok)
    names = [named[i][0] for i in sorted(bad)]
    return names[:limit], len(names)


def explain_probe_failure(model: nn.Module, step: int, exc: BaseException) -> BaseException:
    """``exc``, the error a probe of ``model`` at ``step`` raised; or, where the model's
    weights hold NaN or inf, a :class:`DivergedModelError` that names them (raise it ``from
    exc``). The check itself failing leaves ``exc`` as it is."""
    try:
        names, count = nonfinite_parameters(model)
    except Exception:  # the original error is the one to report
        return exc
    if not count:
        return exc
    more = f" and {count - len(names)} more" if count > len(names) else ""
    error = DivergedModelError(
        f"the model's weights hold NaN or inf at step {step} ({', '.join(names)}{more}): the "
        "run diverged before this probe (its loss and grad norm, sent every step, say when: "
        "the server's NonFiniteTraining alert); a diverged model has no gradient strength "
        f"to measure (the probe's own error: {type(exc).__name__}: {exc})"
    )
    return error
