"""``inversion-monitor show RUN``: one run's recent history and alerts in the terminal.

Reads through :class:`~inversion_monitor.telemetry.reader.RunReader`; options and error
sentences are shared with ``runs`` (:mod:`inversion_monitor.app.remote`).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.proto.v1 import monitor_pb2


def run_show(args: argparse.Namespace) -> int:
    """Handler of ``inversion-monitor show``; failures raise a one-sentence UserError."""
    from inversion_monitor.app.errors import UserError
    from inversion_monitor.app.remote import explain_read_error, open_reader
    from inversion_monitor.telemetry.reader import ReadError, truncation_note

    with open_reader(args) as reader:
        try:
            response = reader.get_run(args.run, history_limit=args.limit)
        except ReadError as exc:
            raise UserError(
                explain_read_error(exc.code, exc.details, args.endpoint, args.run)
            ) from None
    print(format_run(response))
    asked = min(args.limit, response.summary.records)
    note = truncation_note(response, asked, fewer=" (--limit N)")
    if note is not None:
        print(note)
    return 0


def _n(value: float, digits: int = 3, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_run(response: monitor_pb2.GetRunResponse) -> str:
    """The run header, a table of its recent records, and its alerts."""
    from inversion_monitor.app.report import format_alerts
    from inversion_monitor.app.tables import format_table

    run = response.summary
    lines = [
        f"run {run.display_name} ({run.run.run_id})  project {run.run.project or '-'}  "
        f"framework {run.run.framework or '-'}  kind {run.run.kind or '-'}  "
        f"status {run.status}  records {run.records}"
    ]
    rl = run.run.kind == "rl" or any(rec.HasField("reward_mean") for rec in response.history)
    rows = []
    for rec in response.history:
        sp = rec.inversion.spearman
        value = sp.value if sp.HasField("value") else math.nan
        low = sp.ci_low if sp.HasField("ci_low") else math.nan
        high = sp.ci_high if sp.HasField("ci_high") else math.nan
        rows.append(
            [
                str(rec.step),
                str(rec.rank),
                _n(value, sign=True),
                f"[{_n(low, 2, True)}, {_n(high, 2, True)}]",
                _n(rec.entropy.mean if rec.entropy.HasField("mean") else math.nan),
                _n(rec.entropy.p10 if rec.entropy.HasField("p10") else math.nan),
                _n(rec.entropy.p90 if rec.entropy.HasField("p90") else math.nan),
                _n(rec.loss if rec.HasField("loss") else math.nan),
                *(_rl_cells(rec) if rl else []),
            ]
        )
    if rows:
        headers = ["STEP", "RANK", "RHO", "CI", "ENTROPY", "P10", "P90", "LOSS"]
        if rl:
            headers += ["REWARD", "POLICY_H", "COV"]
        lines.append(format_table(headers, rows))
    else:
        lines.append("no records yet")
    alerts = format_alerts(response.alerts)
    lines.append(f"alerts: {len(alerts)}" + ("" if alerts else " (none)"))
    lines.extend("  " + a for a in alerts)
    return "\n".join(lines)


def _rl_cells(rec: monitor_pb2.StepRecord) -> list[str]:
    """Reward, policy entropy and covariance of an RL run's record."""

    def value(name: str) -> float:
        return getattr(rec, name) if rec.HasField(name) else math.nan

    return [
        _n(value("reward_mean")),
        _n(value("policy_entropy_mean")),
        _n(value("entropy_covariance"), 4, True),
    ]
