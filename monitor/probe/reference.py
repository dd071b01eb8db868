"""Brute-force reference for :func:`~inversion_monitor.probe.gradients.logit_gradient_norms`.

One full forward of the batch through the model's own ``forward`` (its head
and logit post-processing included), then for every target token one
backward of its raw logit to the projection weights, the weight gradient
formed in full, split into Q/K/V blocks and reduced with a full SVD (or the
dense entry sum). Packed rows (``position_ids`` restarting between real
tokens) are forwarded one document at a time, each alone in its own forward;
the document boundaries are found here by a plain loop, independently of the
probe's code.
Slow on purpose: it is the ground truth that the fast paths are tested
against, and the baseline of ``benchmarks/bench_probe.py``.

>>> import torch
>>> from inversion_monitor.toy.models import tiny_causal_lm
>>> model = tiny_causal_lm("gpt2", num_layers=1)
>>> ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(0))
>>> reference_norms(model, ids, projections=("q",)).score.shape
torch.Size([5])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inversion_monitor.metrics.norms import Norm, check_norm
from inversion_monitor.probe.architectures import resolve_model
from inversion_monitor.probe.gradients import ProbeResult
from inversion_monitor.probe.sampling import valid_positions
from inversion_monitor.proto.vocabulary import PROJECTIONS


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


def _document_spans(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    targets: list[list[int]],
) -> dict[tuple[int, int, int], list[int]]:
    """(row, start, end) of the packed document holding each target -> target indices.

    Without packing, one span per row covers it whole.
    """
    length = input_ids.shape[1]
    spans: dict[tuple[int, int, int], list[int]] = {}
    for index, (b, t) in enumerate(targets):
        start, end = 0, length
        if position_ids is not None:
            pos = position_ids[b].tolist()
            real = [True] * length if attention_mask is None else attention_mask[b].bool().tolist()

            def boundary(i: int, pos: list[int] = pos, real: list[bool] = real) -> bool:
                return real[i] and real[i - 1] and pos[i] != pos[i - 1] + 1

            start = t
            while start > 0 and not boundary(start):
                start -= 1
            end = t + 1
            while end < length and not boundary(end):
                end += 1
        spans.setdefault((b, start, end), []).append(index)
    return spans


def reference_norms(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
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
    if position_ids is not None:
        position_ids = position_ids.expand(input_ids.shape[0], -1)
    targets = (
        valid_positions(input_ids, attention_mask).nonzero() if positions is None else positions
    )
    if positions is None and position_ids is not None:  # t + 1 must be in t's document
        spans = _document_spans(input_ids, attention_mask, position_ids, targets.tolist())
        inside = [
            i for (_, _, end), ids in spans.items() for i in ids if int(targets[i, 1]) + 1 < end
        ]
        targets = targets[sorted(inside)]
    sites = {
        (layer, proj): resolved.site(layer, proj) for layer in layer_ids for proj in projections
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
    try:
        for w in weights.values():
            w.requires_grad_(True)
        resolved.model.eval()
        target_list = targets.tolist()
        entropies = [torch.zeros(())] * len(target_list)
        per_target: list[dict[tuple[int, str], torch.Tensor]] = [{} for _ in target_list]
        spans = _document_spans(input_ids, attention_mask, position_ids, target_list)
        packed = any(end - start < input_ids.shape[1] for _, start, end in spans)
        with torch.enable_grad():
            if not packed:  # the whole batch in one forward
                spans = {(-1, 0, input_ids.shape[1]): list(range(len(target_list)))}
            for (row, start, end), indices in spans.items():
                rows = slice(None) if row < 0 else slice(row, row + 1)
                kwargs = {}
                if attention_mask is not None:
                    kwargs["attention_mask"] = attention_mask[rows, start:end]
                if position_ids is not None:
                    kwargs["position_ids"] = position_ids[rows, start:end]
                logits = resolved.model(
                    input_ids=input_ids[rows, start:end], use_cache=False, **kwargs
                ).logits
                for index in indices:
                    b, t = target_list[index]
                    row_logits = logits[b if row < 0 else 0, t - start].float()
                    log_p = torch.log_softmax(row_logits.detach(), dim=-1)
                    entropies[index] = -(log_p.exp() * log_p).sum()
                    z = row_logits[input_ids[b, t + 1]]
                    grads = torch.autograd.grad(z, list(weights.values()), retain_graph=True)
                    by_id = dict(zip(weights, grads, strict=True))
                    for component, site in sites.items():
                        conv1d = type(site.module).__name__ == "Conv1D"
                        block = _weight_block_gradient(by_id[id(site.module)], site.columns, conv1d)
                        per_target[index][component] = _matrix_norm(block.float(), norm)
        for component in sites:
            norms[component] = [values[component] for values in per_target]
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
