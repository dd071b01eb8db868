"""Brute-force reference for :func:`~inversion_monitor.probe.gradients.logit_gradient_norms`.

One full forward of the batch, then for every target token one backward of
its raw logit to the projection weights, the weight gradient formed in full,
split into Q/K/V blocks and reduced with a full SVD (or the dense entry sum).
Slow on purpose: it is the ground truth that the fast paths are tested
against, and the baseline of ``benchmarks/bench_probe.py``.

>>> import torch
>>> from inversion_monitor.app.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("gpt2", num_layers=1)
>>> ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(0))
>>> reference_norms(model, ids, projections=("q",)).score.shape
torch.Size([5])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inversion_monitor.metrics.norms import Norm, check_norm
from inversion_monitor.probe.architectures import PROJECTIONS, resolve_model
from inversion_monitor.probe.gradients import ProbeResult
from inversion_monitor.probe.sampling import valid_positions


def _weight_block_gradient(
    weight_grad: torch.Tensor, columns: torch.Tensor | None, conv1d: bool
) -> torch.Tensor:
    """The gradient of one projection's block of a (possibly fused) weight, as [out, in]."""
    grad = weight_grad.T if conv1d else weight_grad  # Conv1D stores W as [in, out]
    return grad if columns is None else grad[columns]


def _matrix_norm(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "nuclear":
        value: torch.Tensor = torch.linalg.svdvals(grad).sum()
    elif norm == "frobenius":
        value = torch.linalg.matrix_norm(grad, ord="fro")
    else:
        value = grad.abs().sum()
    return value


def reference_norms(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    projections: Sequence[str] = PROJECTIONS,
    norm: Norm = "nuclear",
) -> ProbeResult:
    """Same contract as ``logit_gradient_norms``, computed the slow, obvious way.

    Weight gradients are taken with ``torch.autograd.grad`` (``.grad`` is not
    touched); weights that do not require grad are switched on for the call
    and switched back.
    """
    check_norm(norm)
    resolved = resolve_model(model)
    layer_ids = sorted({resolved.layer_index(layer) for layer in (layers or [-1])})
    targets = (
        valid_positions(input_ids, attention_mask).nonzero() if positions is None else positions
    )
    sites = {
        (layer, proj): resolved.projections(layer)[proj]
        for layer in layer_ids
        for proj in projections
    }
    weights: dict[int, torch.Tensor] = {}
    for site in sites.values():
        weight = getattr(site.module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(site.module).__name__} has no weight tensor")
        weights[id(site.module)] = weight
    was_required = {key: w.requires_grad for key, w in weights.items()}
    training = resolved.model.training
    norms: dict[tuple[int, str], list[torch.Tensor]] = {c: [] for c in sites}
    entropies = []
    try:
        for w in weights.values():
            w.requires_grad_(True)
        resolved.model.eval()
        with torch.enable_grad():
            logits = resolved.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
            for b, t in targets.tolist():
                row = logits[b, t].float()
                log_p = torch.log_softmax(row.detach(), dim=-1)
                entropies.append(-(log_p.exp() * log_p).sum())
                z = row[input_ids[b, t + 1]]
                grads = torch.autograd.grad(z, list(weights.values()), retain_graph=True)
                by_id = dict(zip(weights, grads, strict=True))
                for component, site in sites.items():
                    conv1d = type(site.module).__name__ == "Conv1D"
                    block = _weight_block_gradient(by_id[id(site.module)], site.columns, conv1d)
                    norms[component].append(_matrix_norm(block.float(), norm))
    finally:
        resolved.model.train(training)
        for key, w in weights.items():
            w.requires_grad_(was_required[key])
    stacked = {c: torch.stack(v) if v else torch.zeros(0) for c, v in norms.items()}
    count = targets.shape[0]
    score = torch.stack(list(stacked.values())).mean(0) if count else torch.zeros(0)
    return ProbeResult(
        positions=targets,
        entropy=torch.stack(entropies) if entropies else torch.zeros(0),
        norms=stacked,
        score=score,
        tokens=input_ids[targets[:, 0], targets[:, 1] + 1],
    )
