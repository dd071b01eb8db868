"""Attach the monitor to every Trainer a program creates, without editing it.

``inversion-monitor run -- python train.py`` puts a ``sitecustomize`` on the
child's ``PYTHONPATH`` that calls :func:`install`. It adds a post-import hook:
when (and only when) the program itself imports ``transformers.trainer`` or
Lightning's trainer module, ``Trainer.__init__`` is wrapped so each new
trainer gets the matching callback, configured from ``INVERSION_MONITOR_*``
variables, unless the user already added one. Nothing is imported that the
program does not import, and ``INVERSION_MONITOR_DISABLED=1`` turns it off.

>>> install() in (True, False)
True
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_HF_MODULE = "transformers.trainer"
_LIGHTNING_MODULES = ("lightning.pytorch.trainer.trainer", "pytorch_lightning.trainer.trainer")
_lock = threading.Lock()


class _State:
    installed = False
    announced = False


def _disabled() -> bool:
    value = os.environ.get("INVERSION_MONITOR_DISABLED", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _announce(trainer_type: type) -> None:
    """One line, once per process, from the main process only."""
    with _lock:
        if _State.announced:
            return
        _State.announced = True
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    if rank not in ("", "0"):
        return
    endpoint = os.environ.get("INVERSION_MONITOR_ENDPOINT") or "no server (local logs only)"
    print(
        f"inversion-monitor: attached to {trainer_type.__name__}; sending to {endpoint}",
        file=sys.stderr,
        flush=True,
    )


def _hf_callbacks(trainer: Any) -> list[Any]:
    return list(trainer.callback_handler.callbacks)


def _hf_add(trainer: Any, callback: Any) -> None:
    trainer.add_callback(callback)


def _lightning_callbacks(trainer: Any) -> list[Any]:
    return list(trainer.callbacks)


def _lightning_add(trainer: Any, callback: Any) -> None:
    trainer.callbacks.append(callback)


def _patcher(
    callback_path: str,
    callbacks_of: Callable[[Any], list[Any]],
    add: Callable[[Any, Any], None],
) -> Callable[[ModuleType], None]:
    """A patch for a module defining ``Trainer``: new trainers get the callback once."""
    module_name, class_name = callback_path.rsplit(".", 1)

    def patch(module: ModuleType) -> None:
        trainer_cls = getattr(module, "Trainer", None)
        if trainer_cls is None or getattr(trainer_cls.__init__, "_inversion_monitor", False):
            return
        original = trainer_cls.__init__

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            callback_cls = getattr(importlib.import_module(module_name), class_name)
            if not any(isinstance(cb, callback_cls) for cb in callbacks_of(self)):
                add(self, callback_cls())
                _announce(type(self))

        __init__._inversion_monitor = True  # type: ignore[attr-defined]
        trainer_cls.__init__ = __init__

    return patch


_patch_hf = _patcher(
    "inversion_monitor.callbacks.hf.InversionTrainerCallback", _hf_callbacks, _hf_add
)
_patch_lightning = _patcher(
    "inversion_monitor.callbacks.lightning.InversionLightningCallback",
    _lightning_callbacks,
    _lightning_add,
)

_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    _HF_MODULE: _patch_hf,
    **{name: _patch_lightning for name in _LIGHTNING_MODULES},
}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the watched modules."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            self._patch(module)
        except Exception as exc:  # never break the user's program
            print(f"inversion-monitor: could not attach ({exc!r}); continuing", file=sys.stderr)

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, get_source, ...
        return getattr(self._loader, name)


def install() -> bool:
    """Install the post-import hook (idempotent); False when disabled by the environment."""
    if _disabled():
        return False
    with _lock:
        if _State.installed:
            return True
        _State.installed = True
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:  # already imported: patch now
            patch(module)
    sys.meta_path.insert(0, _PostImportFinder())
    return True
