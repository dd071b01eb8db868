"""RL health signals of a policy-gradient step, from tensors the trainer already computed.

Per optimizer step (any number of micro-batches): the policy's token entropy
over completion tokens (mean and quantiles), reward mean and std, advantage
statistics (one value per completion) and Cui et al.'s covariance
Cov(log pi, A) over completion tokens (science.md section 2). Nothing here
runs a forward pass: the inputs are the per-token log-probs, entropies and
advantages of the trainer's own loss computation.

:class:`RLStepAccumulator` pools micro-batches exactly: the covariance of the
step is that of all its masked tokens (``E[lp A] - E[lp] E[A]`` from float64
sums, equal to :func:`~inversion_monitor.metrics.covariance.entropy_covariance` on the
concatenated batch). Quantiles are over at most ``max_tokens`` entropies per
step (evenly strided when there are more). :meth:`RLStats.average` merges the
steps between two records (each field the mean of the steps' values).

>>> import torch
>>> acc = RLStepAccumulator()
>>> acc.add(
...     logprobs=torch.tensor([[-0.1, -2.0, -0.5], [-1.0, -0.2, -9.9]]),
...     entropies=torch.tensor([[0.5, 1.5, 1.0], [2.0, 0.1, 9.0]]),
...     mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
...     advantages=torch.tensor([1.0, -1.0]),
... )
>>> stats = acc.finish(reward_mean=0.5, reward_std=0.25)
>>> round(stats.entropy_covariance, 4), round(stats.policy_entropy_mean, 4), stats.advantage_mean
(-0.128, 1.02, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from inversion_monitor._checks import check_floating, check_mask, check_same_shape

__all__ = ["RL_STATS_KEYS", "RLStats", "RLStepAccumulator", "rl_stats_from_mapping"]

_NAN = math.nan
_QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class RLStats:
    """The RL signals of one optimizer step (or the mean over several: ``steps``).

    NaN: not available (e.g. no advantages given). ``tokens`` counts the
    completion tokens the entropy and covariance were computed over.

    >>> RLStats(reward_mean=0.5).to_dict()["reward_mean"]
    0.5
    """

    reward_mean: float = _NAN
    reward_std: float = _NAN
    policy_entropy_mean: float = _NAN
    policy_entropy_p10: float = _NAN
    policy_entropy_p50: float = _NAN
    policy_entropy_p90: float = _NAN
    advantage_mean: float = _NAN
    advantage_p10: float = _NAN
    advantage_p50: float = _NAN
    advantage_p90: float = _NAN
    entropy_covariance: float = _NAN
    tokens: int = 0
    steps: int = 1

    def to_dict(self) -> dict[str, float]:
        """Plain values (for JSONL and trainer logs)."""
        return {k: float(v) for k, v in asdict(self).items()}

    def health_values(self) -> dict[str, float]:
        """The training-health values it carries (reward, policy entropy, covariance).

        NaN means "not measured" here and is left out; an infinity is kept.

        >>> RLStats(reward_mean=0.5, entropy_covariance=float("inf")).health_values()
        {'reward_mean': 0.5, 'entropy_covariance': inf}
        """
        found = {}
        for name in RL_STATS_KEYS:
            value = float(getattr(self, name))
            if not math.isnan(value):
                found[name] = value
        return found

    def trainer_metrics(self) -> dict[str, float]:
        """The ``rl/...`` keys added to a trainer's logs (finite values only)."""
        return {
            f"rl/{k}": v
            for k, v in self.to_dict().items()
            if k not in ("tokens", "steps") and math.isfinite(v)
        }

    @staticmethod
    def average(items: Iterable[RLStats]) -> RLStats | None:
        """Field-wise mean over steps (NaN fields ignored); None for no steps.

        >>> RLStats.average([RLStats(reward_mean=0.2), RLStats(reward_mean=0.4)]).reward_mean
        0.30000000000000004
        """
        items = list(items)
        if not items:
            return None
        if len(items) == 1:
            return items[0]
        values: dict[str, Any] = {}
        for f in fields(RLStats):
            column = [float(getattr(s, f.name)) for s in items]
            if f.name in ("tokens", "steps"):
                values[f.name] = int(sum(column))
                continue
            finite = [v for v in column if math.isfinite(v)]
            values[f.name] = sum(finite) / len(finite) if finite else _NAN
        return RLStats(**values)


RL_STATS_KEYS = ("reward_mean", "reward_std", "policy_entropy_mean", "entropy_covariance")
"""Keys of a stats mapping (``MonitorClient.log``) that carry RL signals."""


def rl_stats_from_mapping(mapping: Mapping[str, Any]) -> RLStats | None:
    """The :data:`RL_STATS_KEYS` of ``mapping`` as an ``RLStats`` (None when it has none).

    Raises ``ValueError`` naming a key whose value is not a number.

    >>> rl_stats_from_mapping({"spearman": -0.5, "reward_mean": 0.7}).reward_mean
    0.7
    >>> rl_stats_from_mapping({"reward_std": "high"})
    Traceback (most recent call last):
    ...
    ValueError: stats['reward_std'] = 'high' is not a number: pass a float (or leave the key out)
    """
    found: dict[str, Any] = {}
    for key in RL_STATS_KEYS:
        if key not in mapping or mapping[key] is None:
            continue
        value = mapping[key]
        if isinstance(value, bool):
            value = "bool"
        try:
            found[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"stats[{key!r}] = {mapping[key]!r} is not a number: pass a float "
                "(or leave the key out)"
            ) from None
    return RLStats(**found) if found else None


def _quantiles(values: Tensor) -> tuple[float, float, float]:
    if values.numel() == 0:
        return (_NAN, _NAN, _NAN)
    q = torch.quantile(values, torch.tensor(_QUANTILES, dtype=values.dtype))
    return (float(q[0]), float(q[1]), float(q[2]))


class RLStepAccumulator:
    """Pools the micro-batches of one optimizer step; :meth:`finish` gives its ``RLStats``.

    Args:
        max_tokens: entropies kept per step for the quantiles (evenly strided
            beyond it); means and the covariance always use every token.

    Tensors are detached and reduced at once (float64 sums on their device,
    a capped CPU copy of the entropies): memory stays bounded whatever the
    number of micro-batches.
    """

    def __init__(self, max_tokens: int = 65_536) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        self._n = 0
        self._sum_h = 0.0
        self._cov_n = 0
        self._sum_lp = 0.0
        self._sum_a = 0.0
        self._sum_lpa = 0.0
        self._entropies: list[Tensor] = []
        self._kept = 0
        self._advantages: list[Tensor] = []

    @property
    def empty(self) -> bool:
        """True before any micro-batch was added."""
        return self._n == 0 and not self._advantages

    def add(
        self,
        *,
        mask: Tensor,
        entropies: Tensor | None = None,
        logprobs: Tensor | None = None,
        advantages: Tensor | None = None,
    ) -> None:
        """Add one micro-batch: tensors of shape ``(B, T)`` over completion positions.

        ``advantages`` is ``(B,)`` (one per completion, as GRPO) or ``(B, T)``;
        the covariance needs ``logprobs`` and ``advantages``, the entropy
        statistics need ``entropies``. Values outside ``mask`` are never read.
        """
        with torch.no_grad():
            m = check_mask(mask, "mask")
            for name, t in (("entropies", entropies), ("logprobs", logprobs)):
                if t is not None:
                    check_same_shape(check_floating(t, name), m, name, "mask")
            adv = None
            if advantages is not None:
                adv = check_floating(advantages, "advantages").detach()
                if adv.shape not in (m.shape[:1], m.shape):
                    raise ValueError(
                        f"advantages: expected shape (B,) = ({m.shape[0]},) or (B, T) = "
                        f"{tuple(m.shape)}, got {tuple(adv.shape)}"
                    )
                per_completion = adv if adv.ndim == 1 else _row_means(adv, m)
                self._advantages.append(per_completion.to("cpu", torch.float64))
            n = int(m.sum())
            if entropies is not None and n:
                h = entropies.detach()[m].to(torch.float64)
                self._sum_h += float(h.sum())
                self._n += n
                room = self.max_tokens - self._kept
                if room > 0:
                    if h.numel() > room:
                        h = h[torch.linspace(0, h.numel() - 1, room).long()]
                    self._entropies.append(h.cpu())
                    self._kept += h.numel()
            if logprobs is not None and adv is not None and n:
                a = adv if adv.ndim == 2 else adv[:, None].expand(m.shape)
                lp = logprobs.detach()[m].to(torch.float64)
                a = a.to(lp.device)[m].to(torch.float64)
                self._cov_n += n
                self._sum_lp += float(lp.sum())
                self._sum_a += float(a.sum())
                self._sum_lpa += float((lp * a).sum())

    def finish(
        self, *, reward_mean: float | None = None, reward_std: float | None = None
    ) -> RLStats:
        """The step's statistics; the accumulator is reset for the next step."""
        h_mean = self._sum_h / self._n if self._n else _NAN
        h10, h50, h90 = _quantiles(torch.cat(self._entropies)) if self._entropies else (_NAN,) * 3
        if self._cov_n >= 2:
            n = self._cov_n
            cov = self._sum_lpa / n - (self._sum_lp / n) * (self._sum_a / n)
        else:
            cov = _NAN
        adv = torch.cat(self._advantages) if self._advantages else torch.zeros(0)
        adv = adv[torch.isfinite(adv)]
        a10, a50, a90 = _quantiles(adv)
        stats = RLStats(
            reward_mean=_NAN if reward_mean is None else float(reward_mean),
            reward_std=_NAN if reward_std is None else float(reward_std),
            policy_entropy_mean=h_mean,
            policy_entropy_p10=h10,
            policy_entropy_p50=h50,
            policy_entropy_p90=h90,
            advantage_mean=float(adv.mean()) if adv.numel() else _NAN,
            advantage_p10=a10,
            advantage_p50=a50,
            advantage_p90=a90,
            entropy_covariance=cov,
            tokens=self._n or self._cov_n,
        )
        self.reset()
        return stats


def _row_means(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``values`` over ``mask`` (NaN for an empty row)."""
    m = mask.to(values.device)
    v = torch.where(m, values.to(torch.float64), torch.zeros((), dtype=torch.float64))
    return v.sum(1) / m.sum(1).to(torch.float64)
