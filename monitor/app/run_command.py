"""``inversion-monitor run [options] -- COMMAND ...``: zero-code instrumentation.

Runs COMMAND with the monitor attached to every Hugging Face or Lightning
``Trainer`` it creates (see :mod:`inversion_monitor.callbacks.autoattach`).
Options become ``INVERSION_MONITOR_*`` variables of the child, which
inherits them through ``torchrun`` and ``accelerate launch``. The child's
stdin/stdout/stderr are its own; its exit code is returned and SIGINT/SIGTERM
are passed on to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

# option -> MonitorConfig field (validated by MonitorConfig in the child)
_OPTIONS = {
    "endpoint": "server 'host:port' (default: local only)",
    "run_name": "run name",
    "project": "project name",
    "token": "bearer token for the server",
    "every_n_steps": "probe every N optimizer steps (default: adaptive budget)",
    "overhead_budget": "fraction of wall time probes may take (default 0.03)",
    "layers": "decoder blocks, comma-separated (default -1)",
    "projections": "q,k,v,o subset (default all)",
    "tokens_per_probe": "tokens sampled per probe (default 64)",
    "jsonl_path": "also write records to this JSON-lines file",
    "spool_dir": "spill records here while the server is away",
}


def add_run_command(sub: Any) -> None:
    """Register ``run`` on the CLI's sub-parsers."""
    run = sub.add_parser(
        "run",
        help="run a training command with the monitor attached to its Trainers",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        usage="inversion-monitor run [options] -- COMMAND [ARGS...]",
    )
    for name, text in _OPTIONS.items():
        run.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    run.set_defaults(handler=run_with_monitor)


def child_environment(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """The child's environment: options as variables, the bootstrap on PYTHONPATH."""
    env = dict(base)
    for name in _OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            env["INVERSION_MONITOR_" + name.upper()] = str(value)
    paths = [_bootstrap_dir(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _bootstrap_dir() -> str:
    """Where the callbacks package keeps its ``sitecustomize.py`` (found, not imported)."""
    spec = importlib.util.find_spec("inversion_monitor.callbacks")
    if spec is None or spec.origin is None:
        raise RuntimeError("inversion_monitor.callbacks is not installed")
    return os.path.join(os.path.dirname(spec.origin), "_bootstrap")


def run_with_monitor(args: argparse.Namespace) -> int:
    """Run ``args.command``; returns its exit code (128 + N when killed by signal N)."""
    command: Sequence[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "inversion-monitor run: no command given; usage: "
            "inversion-monitor run [options] -- python train.py",
            file=sys.stderr,
        )
        return 2
    env = child_environment(args, dict(os.environ))
    try:
        child = subprocess.Popen(list(command), env=env)
    except FileNotFoundError:
        print(f"inversion-monitor run: command not found: {command[0]}", file=sys.stderr)
        return 127

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
