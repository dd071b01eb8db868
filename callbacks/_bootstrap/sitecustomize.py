"""Loaded at interpreter start by ``inversion-monitor run``: attach the monitor.

Also runs the ``sitecustomize`` this one shadows (if any), so a system or
virtual-environment customisation keeps working. Never raises.
"""

import importlib.util
import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            return


try:
    _chain()
except Exception as exc:  # the shadowed customisation failed on its own
    print(f"inversion-monitor: the original sitecustomize failed: {exc!r}", file=sys.stderr)

try:
    from inversion_monitor.callbacks.autoattach import install

    install()
except Exception as exc:
    print(f"inversion-monitor: not attached ({exc!r}); continuing", file=sys.stderr)
