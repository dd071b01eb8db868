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

from inversion_monitor.config import ENV_PREFIX, MonitorConfig, MonitorConfigError

# every MonitorConfig field is an option, except the switch that would make `run` pointless
_EXCLUDED = frozenset({"disabled"})


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _help(field: str) -> str:
    info = MonitorConfig.model_fields[field]
    value = info.get_default(call_default_factory=True)
    if field == "token":
        return f"{info.description}"
    shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
    return f"{info.description} (default: {shown})"


def _options() -> dict[str, str]:
    """option field -> help, generated from :class:`MonitorConfig` (one source of truth)."""
    return {name: _help(name) for name in MonitorConfig.model_fields if name not in _EXCLUDED}


def add_run_command(sub: Any) -> None:
    """Register ``run`` on the CLI's sub-parsers."""
    run = sub.add_parser(
        "run",
        help="run a training command with the monitor attached to its Trainers",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        usage="inversion-monitor run [options] -- COMMAND [ARGS...]",
    )
    for name, text in _options().items():
        if MonitorConfig.model_fields[name].annotation is bool:
            run.add_argument(
                _option(name),
                dest=name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=text,
            )
        else:
            run.add_argument(_option(name), dest=name, default=None, help=text)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    run.set_defaults(handler=run_with_monitor)


def _option_environment(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    for name in _options():
        value = getattr(args, name, None)
        if isinstance(value, bool):
            env[ENV_PREFIX + name.upper()] = "1" if value else "0"
        elif value is not None:
            env[ENV_PREFIX + name.upper()] = str(value)
    return env


def check_settings(args: argparse.Namespace, environ: dict[str, str]) -> str | None:
    """None when the options and ``INVERSION_MONITOR_*`` variables form a valid config,
    else one sentence naming the option (or variable), the problem and the fix."""
    given = _option_environment(args)
    try:
        MonitorConfig.from_env({**environ, **given})
    except MonitorConfigError as exc:
        problems = []
        for field, message, value in exc.problems:
            name = field.split(".")[0]
            variable = ENV_PREFIX + name.upper()
            if not name:  # a rule across fields, e.g. max_buffer >= batch_size
                where = "the settings"
            elif variable in given:
                where = _option(name)
            else:
                where = f"the variable {variable}"
            problems.append(f"{where}: {message} (got {value!r})")
        return "; ".join(problems) + "; fix it and run again (see inversion-monitor run --help)"
    return None


def child_environment(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """The child's environment: options as variables, the bootstrap on PYTHONPATH."""
    env = {**base, **_option_environment(args)}
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
    problem = check_settings(args, dict(os.environ))
    if problem is not None:
        print(f"inversion-monitor run: {problem}", file=sys.stderr)
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
