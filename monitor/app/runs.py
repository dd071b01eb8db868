"""``inversion-monitor runs``: the runs a monitor server knows, newest activity first.

Only argparse is imported at module level, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from inversion_monitor.app.remote import add_read_options


def add_runs_command(subparsers: Any) -> None:
    """Add ``runs`` to an ``argparse`` sub-parsers object."""
    runs = subparsers.add_parser(
        "runs",
        help="list the runs a monitor server knows",
        description="List runs (newest activity first) through the server's ListRuns call.",
    )
    add_read_options(runs)
    runs.add_argument("--project", default="", help="only runs of this project")
    runs.add_argument("--limit", type=int, default=100, help="at most this many runs (100)")
    runs.set_defaults(handler=run_runs)


def run_runs(args: argparse.Namespace) -> int:
    """Handler of ``inversion-monitor runs``; failures raise a one-sentence UserError."""
    from inversion_monitor.app.errors import UserError
    from inversion_monitor.app.remote import explain_read_error, open_reader
    from inversion_monitor.app.tables import runs_table
    from inversion_monitor.telemetry.reader import ReadError, truncation_note

    with open_reader(args) as reader:
        try:
            response = reader.list_runs(project=args.project, limit=args.limit)
        except ReadError as exc:
            raise UserError(explain_read_error(exc.code, exc.details, args.endpoint)) from None
    if not response.runs:
        print("no runs")
        return 0
    print(runs_table(response.runs, time.time()))
    note = truncation_note(response, args.limit, fewer=" (--limit N, --project P)")
    if note is not None:
        print(note)
    return 0
