"""Predictive entropy per token, computed in bounded memory.

``token_entropy`` works on logits you already have; ``entropy_from_hidden``
streams over vocabulary tiles from final hidden states and the head weight,
so B x T x V logits never exist (TRL 1.x trainers never build them).

Both use H = log Z - (sum_v e^{z_v} z_v) / Z, with a running maximum for
stability, in fp32 whatever the input dtype.

>>> import torch
>>> logits = torch.zeros(2, 3, 8)           # uniform over 8 tokens
>>> token_entropy(logits, unit="bits")
tensor([[3., 3., 3.],
        [3., 3., 3.]])
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Unit = Literal["nats", "bits"]
_UNITS = ("nats", "bits")
# Elements of fp32 scratch per chunk: 2**23 floats = 32 MiB (a few such temporaries live at
# once); at the 0.5B shape's vocabulary (151,936) 55 target rows per chunk.
_DEFAULT_CHUNK_ELEMENTS = 1 << 23
_LOWEST = torch.finfo(torch.float32).min


def _check_unit(unit: str) -> None:
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")


def _to_unit(entropy: torch.Tensor, unit: str) -> torch.Tensor:
    return entropy / math.log(2.0) if unit == "bits" else entropy


def _entropy_update(logits: torch.Tensor, unit: str, chunk_size: int | None) -> int:
    """Validate the inputs of :func:`token_entropy`; returns the row chunk size."""
    _check_unit(unit)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got shape "
            f"{tuple(logits.shape)}"
        )
    if chunk_size is None:
        return max(1, _DEFAULT_CHUNK_ELEMENTS // logits.shape[-1])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _entropy_compute(logits: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """Entropy in nats of each row of ``logits``, ``rows_per_chunk`` rows at a time.

    Per chunk H = log Z - (sum_v e^{z_v - max} (z_v - max)) / Z: the same arithmetic as
    :func:`entropy_from_hidden`'s, so the two agree to rounding (a ``log_softmax`` form
    moved a Pearson rho over near-uniform entropies by 2e-5); a fixed number of ops per chunk
    of rows, whatever its rows.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[start : start + rows_per_chunk].float()
        # -inf logits (masked tokens) have weight 0 and must add 0 to the moment, not
        # 0 * -inf: clamped to fp32's lowest, whose weight exp(lowest) is 0 as well
        shifted = (chunk - chunk.amax(dim=-1, keepdim=True)).clamp_min_(_LOWEST)
        weights = shifted.exp()
        z = weights.sum(dim=-1)
        moment = (weights * shifted).sum(dim=-1)
        torch.sub(z.log(), moment / z, out=out[start : start + rows_per_chunk])
        del chunk, shifted, weights
    return out.reshape(logits.shape[:-1])


def token_entropy(
    logits: torch.Tensor, *, unit: Unit = "nats", chunk_size: int | None = None
) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, as fp32.

    Args:
        logits: ``[..., V]`` raw logits of any floating dtype (bf16 is fine).
        unit: ``"nats"`` (default) or ``"bits"``.
        chunk_size: rows converted to fp32 at a time; default keeps the fp32
            scratch near 32 MiB, so a full fp32 copy of large logits is never made.

    Returns:
        ``logits.shape[:-1]`` fp32 entropies. Rows containing ``+inf`` or NaN
        give NaN; ``-inf`` entries (masked tokens) have zero probability.

    >>> token_entropy(torch.tensor([[0.0, 0.0], [0.0, -float("inf")]]))
    tensor([0.6931, 0.0000])
    """
    rows = _entropy_update(logits, unit, chunk_size)
    return _to_unit(_entropy_compute(logits, rows), unit)


def _hidden_update(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    *,
    head_bias: torch.Tensor | None,
    softcap: float | None,
    unit: str,
    tile: int,
) -> None:
    _check_unit(unit)
    for name, tensor in (("hidden", hidden), ("head_weight", head_weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if head_weight.ndim != 2:
        raise ValueError(
            f"head_weight must be [vocab, hidden], got shape {tuple(head_weight.shape)}"
        )
    if hidden.ndim < 1 or hidden.shape[-1] != head_weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must equal head_weight.shape[1]={head_weight.shape[1]}, "
            f"got hidden shape {tuple(hidden.shape)}"
        )
    if head_bias is not None and tuple(head_bias.shape) != (head_weight.shape[0],):
        raise ValueError(
            f"head_bias must have shape ({head_weight.shape[0]},), got {tuple(head_bias.shape)}"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")


def apply_logit_transform(
    logits: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None
) -> torch.Tensor:
    """The model's own logit post-processing: ``scale``, then ``cap * tanh(z / cap)``.

    >>> apply_logit_transform(torch.tensor([0.0, 100.0]), softcap=30.0)
    tensor([ 0.0000, 29.9237])
    """
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def entropy_from_hidden(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    unit: Unit = "nats",
    tile: int = 8192,
    row_chunk: int = 1024,
) -> torch.Tensor:
    """Entropy of ``softmax(transform(hidden @ head_weight.T + head_bias))``, streamed.

    Only ``row_chunk x tile`` logits exist at a time; an online log-sum-exp
    carries the running maximum, normaliser and first moment across tiles.

    Args:
        hidden: ``[..., d]`` final hidden states (after the final norm).
        head_weight: ``[V, d]`` output embedding (``lm_head.weight``).
        head_bias: optional ``[V]`` bias.
        logit_scale, softcap: the model's logit post-processing (see
            :func:`apply_logit_transform`).
        tile: vocabulary entries per tile.
        row_chunk: hidden rows per pass.

    >>> h = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    >>> w = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    >>> full = token_entropy(h @ w.T)
    >>> torch.allclose(entropy_from_hidden(h, w, tile=7), full, atol=1e-5)
    True
    """
    _hidden_update(hidden, head_weight, head_bias=head_bias, softcap=softcap, unit=unit, tile=tile)
    if isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk < 1:
        raise ValueError(f"row_chunk must be a positive int, got {row_chunk!r}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    vocab = head_weight.shape[0]
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, flat.shape[0], row_chunk):
        rows = flat[start : start + row_chunk]
        running_max = torch.full((rows.shape[0],), -math.inf, device=hidden.device)
        normaliser = torch.zeros(rows.shape[0], device=hidden.device)
        moment = torch.zeros(rows.shape[0], device=hidden.device)
        for v0 in range(0, vocab, tile):
            logits = rows @ head_weight[v0 : v0 + tile].T
            if head_bias is not None:
                logits = logits + head_bias[v0 : v0 + tile]
            logits = apply_logit_transform(logits.float(), logit_scale=logit_scale, softcap=softcap)
            # moment = sum_v w_v (z_v - running_max): relative to the maximum, so a
            # peaked distribution's small entropy is not a difference of large numbers
            new_max = torch.maximum(running_max, logits.amax(dim=-1))
            shift = running_max - new_max
            rescale = torch.exp(shift)
            carried = torch.where(normaliser > 0, moment + shift * normaliser, 0.0)
            shifted = logits - new_max[:, None]
            weights = torch.exp(shifted)
            normaliser = normaliser * rescale + weights.sum(dim=-1)
            moment = carried * rescale + torch.where(weights > 0, weights * shifted, 0.0).sum(-1)
            running_max = new_max
        out[start : start + row_chunk] = normaliser.log() - moment / normaliser
    return _to_unit(out, unit).reshape(hidden.shape[:-1])
