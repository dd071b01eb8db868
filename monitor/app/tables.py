"""Plain-text tables of the command line (``runs``, ``show``).

>>> print(format_table(["NAME", "STEP"], [["demo", "12"], ["longer-name", "3"]]))
NAME         STEP
demo         12
longer-name  3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.proto.v1 import monitor_pb2


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def age(then: float, now: float) -> str:
    """``then`` relative to ``now``: ``'5s ago'``, ``'3m ago'``, ... (``'-'`` when unset).

    >>> age(100.0, 400.0), age(0.0, 1.0)
    ('5m ago', '-')
    """
    if not then:
        return "-"
    seconds = max(0.0, now - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def runs_table(runs: Sequence[monitor_pb2.RunSummary], now: float) -> str:
    """The ``runs`` table: one line per run summary."""
    headers = [
        "NAME",
        "PROJECT",
        "KIND",
        "STATUS",
        "STEP",
        "RHO",
        "ENTROPY",
        "RECORDS",
        "UPDATED",
        "ALERTS",
    ]
    rows = []
    for run in runs:
        latest = run.latest if run.HasField("latest") else None
        rho = entropy = None
        if latest is not None:
            if latest.inversion.spearman.HasField("value"):
                rho = latest.inversion.spearman.value
            if latest.entropy.HasField("mean"):
                entropy = latest.entropy.mean
        rows.append(
            [
                run.display_name,
                run.run.project or "-",
                run.run.kind or "-",
                run.status,
                str(latest.step) if latest is not None else "-",
                _number(rho, 3),
                _number(entropy, 3),
                str(run.records),
                age(run.last_update_time, now),
                ",".join(f"{a.name}({a.severity})" for a in run.active_alerts) or "-",
            ]
        )
    return format_table(headers, rows)
