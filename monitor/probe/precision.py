"""The precision a probe computes in: the training forward's autocast, read from torch.

Users train under autocast (HF ``bf16=True``/``fp16=True``, Lightning
``bf16-mixed``/``16-mixed``, a custom loop's ``torch.autocast``): the logits
the model computes are then the autocast ones, so the probe runs the model's
forward under the same autocast (science.md section 5). :class:`ProbePrecision`
is that state (device type, dtype, enabled), read where the training forward
runs (:meth:`ProbePrecision.current`, e.g. in a decoder block's pre-hook: HF
and accelerate wrap the model's ``forward`` in autocast, so a hook on the
model itself runs before it is entered). Only the model's forward runs under
it (:meth:`ProbePrecision.forward_context`); the small dense factor math (QR,
Gram matrices, eigenvalues, entropy sums) stays in fp32/fp64, outside any
autocast (:func:`without_autocast`).

>>> import torch
>>> ProbePrecision.current("cpu").label(torch.float32)
'fp32'
>>> with torch.autocast("cpu", dtype=torch.bfloat16):
...     precision = ProbePrecision.current("cpu")
>>> precision, precision.label(torch.float32)
(ProbePrecision(device_type='cpu', dtype=torch.bfloat16, enabled=True), 'bf16-autocast')
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from inversion_monitor.proto.vocabulary import ProbePrecisionName

__all__ = ["ProbePrecision", "dtype_name", "without_autocast"]

_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
# the device types autocast knows and this module switches off around the factor math
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def dtype_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"bf16"``, ...: the short name of a floating dtype.

    >>> dtype_name(torch.bfloat16)
    'bf16'
    """
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"no precision name for {dtype}: the probe computes in {_DTYPE_NAMES}")
    return name


@dataclass(frozen=True)
class ProbePrecision:
    """An autocast state: ``enabled`` on ``device_type`` with ``dtype`` (or off).

    Attributes:
        device_type: ``"cpu"``, ``"cuda"``, ...: autocast's device type.
        dtype: the autocast's lower-precision dtype (bf16 or fp16).
        enabled: whether autocast was on.
    """

    device_type: str
    dtype: torch.dtype
    enabled: bool

    @classmethod
    def current(cls, device_type: str) -> ProbePrecision:
        """The autocast state now on ``device_type`` (off where autocast does not exist)."""
        if not torch.amp.is_autocast_available(device_type):
            return cls(device_type, torch.float32, False)
        enabled = torch.is_autocast_enabled(device_type)
        return cls(device_type, torch.get_autocast_dtype(device_type), enabled)

    def label(self, parameter_dtype: torch.dtype) -> ProbePrecisionName:
        """What the probe's forward computes in: ``"bf16-autocast"``, ``"fp16-autocast"``, or
        (autocast off) the parameters' dtype (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"``)."""
        if self.enabled and self.dtype in (torch.bfloat16, torch.float16):
            return "bf16-autocast" if self.dtype == torch.bfloat16 else "fp16-autocast"
        name = dtype_name(parameter_dtype)
        assert name in ("fp32", "fp64", "bf16", "fp16")
        return name  # type: ignore[return-value]

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """Autocast as recorded (on or off) on its device type, for the model's forward."""
        if not torch.amp.is_autocast_available(self.device_type):
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            yield


@contextmanager
def without_autocast() -> Iterator[None]:
    """Autocast off on every device type (the probe's factor math computes in fp32/fp64;
    a caller's ``torch.autocast`` block would otherwise run its matmuls in bf16)."""
    with ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICES:
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(
                device_type
            ):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
