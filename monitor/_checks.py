"""Argument checks shared by the metric functions: each error says expected vs got.

Private helpers; the public functions call them in their ``_x_update`` step.

>>> import torch
>>> check_floating(torch.tensor([1, 2]), "entropy")
Traceback (most recent call last):
    ...
TypeError: entropy: expected a floating-point tensor (...), got torch.int64; convert ...
"""

from __future__ import annotations

import numbers
import operator
import warnings

import torch
from torch import Tensor


class DegenerateInputWarning(UserWarning):
    """A statistic was asked of input that cannot support it; the result is NaN.

    Raised (as a warning) for constant or non-finite input and too few values.
    Filter it like any warning:

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_degenerate("spearman", "x is constant", stacklevel=1)
    >>> caught[0].category.__name__, str(caught[0].message)
    ('DegenerateInputWarning', 'spearman is NaN: x is constant')
    """


def warn_degenerate(what: str, reason: str, *, stacklevel: int = 3) -> None:
    """Warn that ``what`` is NaN because of ``reason`` (points at the public caller)."""
    warnings.warn(f"{what} is NaN: {reason}", DegenerateInputWarning, stacklevel=stacklevel)


def check_tensor(value: object, name: str) -> Tensor:
    """``value`` must be a ``torch.Tensor``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(value: object, name: str) -> Tensor:
    """``value`` must be a real floating-point tensor."""
    t = check_tensor(value, name)
    if not t.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}; convert it with .float()"
        )
    return t


def check_integer(value: object, name: str) -> Tensor:
    """``value`` must be an integer (not bool) tensor, e.g. token ids."""
    t = check_tensor(value, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (e.g. torch.int64), got {t.dtype}")
    return t


def check_ndim(t: Tensor, name: str, ndim: int, layout: str) -> None:
    """``t`` must have ``ndim`` dimensions; ``layout`` names them, e.g. ``"(B, T)"``."""
    if t.ndim != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor of shape {layout}, "
            f"got ndim={t.ndim} with shape {tuple(t.shape)}"
        )


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """``a`` and ``b`` must have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b}: expected the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """``a`` and ``b`` must live on the same device."""
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b}: expected the same device, got {a.device} and {b.device}"
        )


def check_mask(value: object, name: str) -> Tensor:
    """A mask: bool, or integer/floating with values in {0, 1}; returned as bool."""
    t = check_tensor(value, name)
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise TypeError(f"{name}: expected a bool or 0/1 tensor, got {t.dtype}")
    bad = int(((t != 0) & (t != 1)).sum())
    if bad:
        raise ValueError(
            f"{name}: expected a bool or 0/1 tensor, got {bad} value(s) other than 0 and 1 "
            f"(dtype {t.dtype})"
        )
    return t != 0


def check_int(value: object, name: str, *, minimum: int) -> int:
    """``value`` must be an int (not bool) >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int >= {minimum}, got bool {value}")
    try:
        as_int = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}"
        ) from None
    if as_int < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {as_int}")
    return int(as_int)


def check_confidence(value: object, name: str = "confidence") -> float:
    """``value`` must be a real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}: expected a float in (0, 1), e.g. 0.95, got {type(value).__name__} {value!r}"
        )
    as_float = float(value)
    if not 0.0 < as_float < 1.0:  # also rejects NaN
        raise ValueError(f"{name}: expected a float in (0, 1), e.g. 0.95, got {value!r}")
    return as_float


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def as_float64(t: Tensor) -> Tensor:
    """A detached float64 copy-or-view on ``t``'s device (CPU for MPS, which lacks float64)."""
    device = torch.device("cpu") if t.device.type == "mps" else t.device
    return t.detach().to(device=device, dtype=torch.float64)
