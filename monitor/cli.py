"""The ``inversion-monitor`` command line.

Sub-commands import what they need when they run, so ``--help`` and
``--version`` answer instantly and never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from inversion_monitor._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``inversion-monitor`` with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="inversion-monitor",
        description=(
            "Training-health monitor for language models: Entropy-Gradient Inversion, "
            "entropy collapse and CorR-PO."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a tiny model with the monitor attached and report what it saw"
    )
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.set_defaults(handler=_run_demo)
    from inversion_monitor.server.cli import add_server_commands  # argparse only

    add_server_commands(sub)
    from inversion_monitor.run_command import add_run_command  # argparse only

    add_run_command(sub)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from inversion_monitor.demo import run_demo

    return run_demo(steps=args.steps)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        code: int = handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
