"""The training health of one optimizer step: the values the trainer already has.

:func:`step_health` gathers, for the record every optimizer step sends
(whatever the probe schedule), the step's loss, gradient norm (before
clipping), learning rate and, in RL runs, the reward, policy entropy,
covariance, KL, clip ratio and completion length, under the names of
:data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`. Nothing here runs a
forward pass or touches the model: the framework adapters read what the
trainer computed (see ``inversion_monitor.callbacks``), a custom loop passes
its own numbers. NaN and infinities are kept: a diverged step is news.

>>> from inversion_monitor.rl.signals import RLStats
>>> step_health(loss=2.5, grad_norm=float("inf"), rl=RLStats(reward_mean=0.3),
...             extra={"kl": 0.02})
{'reward_mean': 0.3, 'kl': 0.02, 'loss': 2.5, 'grad_norm': inf}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inversion_monitor.proto.vocabulary import HEALTH_FIELDS
from inversion_monitor.rl.signals import RLStats

__all__ = ["HEALTH_FIELDS", "step_health"]

_KNOWN = frozenset(HEALTH_FIELDS)


def step_health(
    *,
    loss: Any = None,
    learning_rate: Any = None,
    grad_norm: Any = None,
    rl: RLStats | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The step's health values as floats (None: not known, left out).

    ``rl`` gives the reward, policy entropy and covariance it measured;
    ``extra`` any health field by name (e.g. ``kl``, ``clip_ratio``,
    ``completion_length_mean``); the named arguments win over both. A
    0-dim tensor is read with ``float()`` (a device sync: adapters pass
    numbers they already read). Raises ``ValueError`` naming an unknown key
    or a value that is not a number.
    """
    values: dict[str, float] = rl.health_values() if rl is not None else {}
    if extra:
        for name, value in extra.items():
            if name not in _KNOWN:
                raise ValueError(
                    f"health[{name!r}] is not a health field (known: {', '.join(HEALTH_FIELDS)})"
                )
            _put(values, name, value)
    _put(values, "loss", loss)
    _put(values, "learning_rate", learning_rate)
    _put(values, "grad_norm", grad_norm)
    return values


def _put(values: dict[str, float], name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"{name}={value!r} is not a number: pass a float or None")
    try:
        values[name] = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number: pass a float or None") from None
