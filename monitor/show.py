"""``inversion-monitor show RUN``: one run's recent history and alerts in the terminal.

>>> explain_rpc_error("UNAVAILABLE", "connection refused", "127.0.0.1:1", "r")[:40]
'no monitor server answers at 127.0.0.1:1'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from inversion_monitor.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.proto.v1 import monitor_pb2


def explain_rpc_error(code: str, details: str, endpoint: str, run: str) -> str:
    """One sentence naming the cause of a failed call and the fix."""
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (
            f"no monitor server answers at {endpoint} ({details}): start one with "
            "'inversion-monitor serve' or pass --endpoint HOST:PORT"
        )
    if code == "NOT_FOUND":
        return (
            f"the server at {endpoint} has no run {run!r}: list the runs with "
            f"'inversion-monitor runs --endpoint {endpoint}'"
        )
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return (
            f"the server at {endpoint} refused the request ({details}): pass its token with "
            "--token or INVERSION_MONITOR_TOKEN"
        )
    return f"the server at {endpoint} answered {code} ({details}): see its log"


def get_run(
    endpoint: str,
    run: str,
    *,
    token: str | None = None,
    tls_ca: Path | None = None,
    limit: int = 20,
    timeout: float = 10.0,
) -> monitor_pb2.GetRunResponse:
    """``GetRun`` from the server at ``endpoint``; failures become :class:`UserError`."""
    import grpc

    from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc

    if tls_ca is not None:
        if not tls_ca.is_file():
            raise UserError(f"--tls-ca file {tls_ca} does not exist: pass the server's CA file")
        creds = grpc.ssl_channel_credentials(tls_ca.read_bytes())
        channel = grpc.secure_channel(endpoint, creds)
    else:
        channel = grpc.insecure_channel(endpoint)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            response: monitor_pb2.GetRunResponse = stub.GetRun(
                monitor_pb2.GetRunRequest(run=run, history_limit=limit),
                timeout=timeout,
                metadata=metadata,
            )
        except grpc.RpcError as exc:
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            raise UserError(explain_rpc_error(name, str(exc.details()), endpoint, run)) from None
    return response


def _n(value: float, digits: int = 3, sign: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_run(response: monitor_pb2.GetRunResponse) -> str:
    """The run header, a table of its recent records, and its alerts."""
    from inversion_monitor.report import format_alerts
    from inversion_monitor.server.cli import format_table

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
                *(
                    [
                        _n(rec.reward_mean if rec.HasField("reward_mean") else math.nan),
                        _n(
                            rec.policy_entropy_mean
                            if rec.HasField("policy_entropy_mean")
                            else math.nan
                        ),
                        _n(
                            rec.entropy_covariance
                            if rec.HasField("entropy_covariance")
                            else math.nan,
                            4,
                            True,
                        ),
                    ]
                    if rl
                    else []
                ),
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
