"""Adapters that attach the monitor to training frameworks.

Each adapter lives in its own module and imports its framework only when used,
so ``import inversion_monitor.callbacks`` never pulls in Lightning for Hugging
Face users, or transformers for Lightning users.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY_EXPORTS: dict[str, str] = {
    "CorrPOConfig": ".trl_corrpo",
    "CorrPOGRPOTrainer": ".trl_corrpo",
    "InversionLightningCallback": ".lightning",
    "InversionTrainerCallback": ".hf",
}

__all__ = [
    "CorrPOConfig",
    "CorrPOGRPOTrainer",
    "InversionLightningCallback",
    "InversionTrainerCallback",
]  # sorted(_LAZY_EXPORTS), checked by a test


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'inversion_monitor.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value
