"""The ``inversion-monitor`` command line.

Sub-commands import what they need when they run, so ``--help`` and
``--version`` answer instantly and never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from inversion_monitor._version import __version__
from inversion_monitor.app.remote import add_read_options


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
        "demo",
        help="SFT, RL and a destabilised RL run of a tiny model, watched by the monitor: "
        "a live page, an alert to a webhook, a report",
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=400,
        help="SFT steps; the RL phases scale with it (default 400)",
    )
    demo.add_argument(
        "--framework",
        choices=["transformers", "lightning"],
        default="transformers",
        help="train with the Hugging Face Trainer (default) or Lightning",
    )
    demo.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the server up after training (curl /metrics, point Prometheus at it)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("inversion-monitor-demo"),
        metavar="DIR",
        help="where report.html goes (default ./inversion-monitor-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(handler=_run_demo)

    fp = sub.add_parser(
        "fingerprint",
        help="measure the entropy-gradient correlation of a saved checkpoint on your texts",
        description=(
            "Load a local Hugging Face checkpoint directory (no downloads), probe the tokens of "
            "a .txt (one text per line) or .jsonl file ('text', or 'prompt'/'completion' where "
            "only completion tokens are measured) and report Spearman and Pearson with "
            "confidence intervals, overall and per layer and projection."
        ),
    )
    fp.add_argument("--model", type=Path, required=True, metavar="DIR", help="checkpoint directory")
    fp.add_argument("--data", type=Path, required=True, metavar="FILE", help=".txt or .jsonl")
    fp.add_argument(
        "--compare", type=Path, metavar="DIR2", help="a second checkpoint, side by side"
    )
    fp.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[-1],
        metavar="L",
        help="decoder blocks to probe, negative from the end (default -1)",
    )
    fp.add_argument(
        "--per-token-type",
        action="store_true",
        help="also the Spearman over per-token-type averages",
    )
    fp.add_argument(
        "--max-tokens", type=int, default=4096, metavar="N", help="tokens to measure (4096)"
    )
    fp.add_argument(
        "--out", type=Path, metavar="FILE", help="write an HTML report with the scatter"
    )
    fp.add_argument("--json", action="store_true", help="print JSON for scripts")
    fp.set_defaults(handler=_run_fingerprint)

    show = sub.add_parser("show", help="one run's recent history and alerts")
    show.add_argument("run", metavar="RUN", help="run id or display name")
    add_read_options(show)
    show.add_argument("--limit", type=int, default=20, help="recent records to show (20)")
    show.set_defaults(handler=_run_show)
    from inversion_monitor.app.runs import add_runs_command  # argparse only

    add_runs_command(sub)
    from inversion_monitor.server.cli import add_serve_command  # argparse only

    add_serve_command(sub)
    from inversion_monitor.app.run_command import add_run_command  # argparse only

    add_run_command(sub)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from inversion_monitor.app.demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            steps=args.steps,
            framework=args.framework,
            keep_serving=args.keep_serving,
            out=args.out,
            seed=args.seed,
        )
    )


def _run_fingerprint(args: argparse.Namespace) -> int:
    from inversion_monitor.app.fingerprint import run_fingerprint

    return run_fingerprint(
        model=args.model,
        data=args.data,
        compare=args.compare,
        layers=args.layers,
        per_token_type=args.per_token_type,
        max_tokens=args.max_tokens,
        out=args.out,
        as_json=args.json,
    )


def _run_show(args: argparse.Namespace) -> int:
    from inversion_monitor.app.show import run_show

    return run_show(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    from inversion_monitor.app.errors import UserError

    try:
        code: int = handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if args.debug:
            raise
        print(f"inversion-monitor {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
