"""Which token positions to probe: valid next-token positions and a seeded sampler.

A position t of a sequence predicts token t+1, so it is usable only when both
t and t+1 are real tokens (:func:`valid_positions`). :class:`TokenSampler`
draws a bounded, reproducible subset of them per batch without ever touching
the global RNGs of torch, numpy or Python.

>>> import torch
>>> ids = torch.tensor([[5, 6, 7, 0], [0, 5, 6, 7]])
>>> mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
>>> valid = valid_positions(ids, mask)
>>> valid
tensor([[ True,  True, False, False],
        [False,  True,  True, False]])
>>> TokenSampler(max_tokens=3, seed=0).sample(valid).tolist()
[[0, 1], [1, 1], [1, 2]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from inversion_monitor._checks import (
    check_floating,
    check_int,
    check_mask,
    check_ndim,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from inversion_monitor.config import MonitorConfig

__all__ = ["TokenSampler", "valid_positions"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a well-mixed 64-bit function of a 64-bit integer."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _call_seed(seed: int, call: int) -> int:
    """The generator seed of call number ``call`` (63 bits, accepted by manual_seed)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ call) >> 1


def valid_positions(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Positions that predict a real next token: t+1 < T and mask[t] = mask[t+1] = 1.

    Works for right and left padding (and any holes). Without
    ``attention_mask`` every token is real, so all t < T - 1 are valid.

    Args:
        input_ids: shape ``(B, T)`` (only its shape and device are used).
        attention_mask: shape ``(B, T)``, bool or 0/1.

    Returns:
        bool tensor ``(B, T)`` on ``input_ids``'s device.

    >>> valid_positions(torch.tensor([[3, 4, 5]]))
    tensor([[ True,  True, False]])
    """
    ids = check_tensor(input_ids, "input_ids")
    check_ndim(ids, "input_ids", 2, "(B, T)")
    if attention_mask is None:
        real = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    else:
        real = check_mask(attention_mask, "attention_mask")
        check_same_shape(ids, real, "input_ids", "attention_mask")
        check_same_device(ids, real, "input_ids", "attention_mask")
    valid = torch.zeros_like(real)
    valid[:, :-1] = real[:, :-1] & real[:, 1:]
    return valid


class TokenSampler:
    """Draws at most ``max_tokens`` valid positions per batch, reproducibly.

    - Uniform over the valid positions, without replacement; all of them when
      there are at most ``max_tokens``.
    - ``max_sequences``: first keep at most that many sequences (those with a
      valid position, chosen uniformly), then sample positions among them.
    - ``stratify_by_entropy``: split the valid positions into ``n_strata``
      equal-count groups by entropy rank (quantile strata; NaN ranks last) and
      draw equally from each (strata too small to fill their share give the
      rest to the others; ties in the share are broken at random).
    - Output ``LongTensor [N, 2]`` of (batch index, t), sorted by batch then t,
      on the mask's device (the draw itself runs on the CPU: a CUDA mask is
      copied over, one small device sync).

    Randomness: a private CPU ``torch.Generator`` reseeded for each call from
    (seed, call number), so call k draws the same whatever earlier calls
    were given. The global torch, numpy and Python RNGs are never used.
    :meth:`state_dict` holds the seed and the call count: a resumed run
    samples exactly as the uninterrupted one.

    >>> valid = torch.ones(2, 6, dtype=torch.bool)
    >>> sampler = TokenSampler(max_tokens=4, seed=7)
    >>> sampler.sample(valid).tolist()
    [[0, 4], [1, 0], [1, 4], [1, 5]]
    >>> entropy = torch.arange(12.0).reshape(2, 6)  # row 0 low, row 1 high
    >>> strat = TokenSampler(max_tokens=4, stratify_by_entropy=True, n_strata=2, seed=7)
    >>> strat.sample(valid, entropy=entropy)[:, 0].tolist()
    [0, 0, 1, 1]
    >>> state = sampler.state_dict()
    >>> state
    {'seed': 7, 'calls': 1}
    >>> resumed = TokenSampler(max_tokens=4, seed=7)
    >>> resumed.load_state_dict(state)
    >>> torch.equal(resumed.sample(valid), sampler.sample(valid))
    True
    """

    def __init__(
        self,
        max_tokens: int,
        *,
        max_sequences: int | None = None,
        stratify_by_entropy: bool = False,
        n_strata: int = 4,
        seed: int = 0,
    ) -> None:
        self.max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
        self.max_sequences = (
            None if max_sequences is None else check_int(max_sequences, "max_sequences", minimum=1)
        )
        if not isinstance(stratify_by_entropy, bool):
            raise TypeError(
                f"stratify_by_entropy: expected a bool, got {type(stratify_by_entropy).__name__}"
            )
        self.stratify_by_entropy = stratify_by_entropy
        self.n_strata = check_int(n_strata, "n_strata", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        self._calls = 0
        self._generator = torch.Generator(device="cpu")

    @classmethod
    def from_config(cls, config: MonitorConfig, *, rank: int = 0) -> TokenSampler:
        """The sampler ``config`` asks for; each rank draws its own stream (seed + rank).

        >>> TokenSampler.from_config(MonitorConfig(tokens_per_probe=8), rank=1).seed
        1
        """
        return cls(
            config.tokens_per_probe,
            max_sequences=config.sequences_per_probe,
            seed=config.seed + rank,
        )

    @property
    def calls(self) -> int:
        """How many times :meth:`sample` has run (selects the next draw)."""
        return self._calls

    def sample(self, valid_mask: Tensor, *, entropy: Tensor | None = None) -> Tensor:
        """Positions to probe: ``LongTensor [N, 2]`` of (batch index, t), sorted.

        Args:
            valid_mask: shape ``(B, T)``, bool or 0/1, e.g. from :func:`valid_positions`.
            entropy: shape ``(B, T)``, floating; required iff ``stratify_by_entropy``.
        """
        mask, ent = self._sample_update(valid_mask, entropy)
        self._generator.manual_seed(_call_seed(self.seed, self._calls))
        self._calls += 1
        return self._sample_compute(mask.cpu(), None if ent is None else ent.cpu()).to(mask.device)

    def _sample_update(self, valid_mask: object, entropy: object) -> tuple[Tensor, Tensor | None]:
        mask = check_mask(valid_mask, "valid_mask")
        check_ndim(mask, "valid_mask", 2, "(B, T)")
        if self.stratify_by_entropy and entropy is None:
            raise ValueError(
                "entropy: expected a (B, T) tensor because stratify_by_entropy=True, got None"
            )
        if not self.stratify_by_entropy and entropy is not None:
            raise ValueError(
                "entropy: only used with stratify_by_entropy=True, got entropy with "
                "stratify_by_entropy=False; construct TokenSampler(..., stratify_by_entropy=True) "
                "or drop entropy"
            )
        if entropy is None:
            return mask, None
        ent = check_floating(entropy, "entropy")
        check_same_shape(mask, ent, "valid_mask", "entropy")
        check_same_device(mask, ent, "valid_mask", "entropy")
        return mask, ent

    def _sample_compute(self, mask: Tensor, entropy: Tensor | None) -> Tensor:
        gen = self._generator
        if self.max_sequences is not None:
            rows = mask.any(dim=1).nonzero().squeeze(1)
            if rows.numel() > self.max_sequences:
                chosen = rows[torch.randperm(rows.numel(), generator=gen)[: self.max_sequences]]
                keep = torch.zeros(mask.shape[0], dtype=torch.bool)
                keep[chosen] = True
                mask = mask & keep[:, None]
        positions = mask.nonzero()  # row-major: sorted by batch, then t
        count = positions.shape[0]
        if count <= self.max_tokens:
            return positions
        if entropy is None:
            pick = torch.randperm(count, generator=gen)[: self.max_tokens]
        else:
            pick = self._stratified(entropy[mask].to(torch.float64))
        return positions[torch.sort(pick).values]

    def _stratified(self, values: Tensor) -> Tensor:
        """Indices into ``values``: an equal share from each equal-count entropy stratum."""
        gen = self._generator
        count = values.numel()
        k = min(self.n_strata, count)
        stratum = torch.empty(count, dtype=torch.int64)
        stratum[torch.sort(values, stable=True).indices] = torch.arange(count) * k // count
        sizes = torch.bincount(stratum, minlength=k)
        quotas = torch.tensor(self._allocate(sizes.tolist()), dtype=torch.int64)
        # random order within each stratum: shuffle, then stable-sort by stratum
        shuffled = torch.randperm(count, generator=gen)
        order = shuffled[torch.sort(stratum[shuffled], stable=True).indices]
        ordered_stratum = stratum[order]
        starts = torch.cumsum(sizes, 0) - sizes
        rank_in_stratum = torch.arange(count) - starts[ordered_stratum]
        return order[rank_in_stratum < quotas[ordered_stratum]]

    def _allocate(self, sizes: list[int]) -> list[int]:
        """Split max_tokens (< sum(sizes)) as equally as the stratum sizes allow."""
        quotas = [0] * len(sizes)
        remaining = self.max_tokens
        open_strata = [i for i, size in enumerate(sizes) if size > 0]
        # each round fills the budget or closes a stratum: at most len(sizes) rounds
        while remaining > 0 and open_strata:
            share, leftover = divmod(remaining, len(open_strata))
            order = torch.randperm(len(open_strata), generator=self._generator).tolist()
            for rank, j in enumerate(order):
                i = open_strata[j]
                take = min(share + (1 if rank < leftover else 0), sizes[i] - quotas[i])
                quotas[i] += take
                remaining -= take
            open_strata = [i for i in open_strata if quotas[i] < sizes[i]]
        return quotas

    def state_dict(self) -> dict[str, int]:
        """The seed and the call count: all a resumed run needs to sample the same."""
        return {"seed": self.seed, "calls": self._calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (seed and call count)."""
        if not isinstance(state, Mapping) or set(state) != {"seed", "calls"}:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"state: expected a mapping with keys ['calls', 'seed'] from "
                f"TokenSampler.state_dict(), got {got}"
            )
        seed = check_int(state["seed"], "state['seed']", minimum=0)
        calls = check_int(state["calls"], "state['calls']", minimum=0)
        self.seed, self._calls = seed, calls
