"""What a run's stored records say: a terminal summary and a self-contained HTML report.

Everything here reads the server's records (``GetRunResponse``), so the
numbers printed and plotted are the ones the server stored.

>>> from inversion_monitor.proto.v1 import monitor_pb2
>>> rec = monitor_pb2.StepRecord(step=10)
>>> rec.inversion.spearman.value = -0.4
>>> rec.entropy.mean = 1.5
>>> [(p.step, p.rho, p.entropy_mean) for p in trajectory([rec])]
[(10, -0.4, 1.5)]
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.proto.v1 import monitor_pb2


@dataclass(frozen=True)
class TrajectoryPoint:
    """One stored record reduced to what the summary shows.

    >>> TrajectoryPoint(1, -0.5, -0.6, -0.4, 2.0, 1.0, 2.0, 3.0, 0.1).rho
    -0.5
    """

    step: int
    rho: float
    ci_low: float
    ci_high: float
    entropy_mean: float
    entropy_p10: float
    entropy_p50: float
    entropy_p90: float
    score_mean: float


def _opt(message: Any, field: str) -> float:
    return float(getattr(message, field)) if message.HasField(field) else math.nan


def trajectory(records: Sequence[monitor_pb2.StepRecord]) -> list[TrajectoryPoint]:
    """One point per probe record, in step order (rank 0's records when several ranks sent);
    the per-step health records without inversion statistics are not points."""
    points = []
    for rec in sorted(records, key=lambda r: (r.step, r.rank)):
        if rec.rank != 0 or not rec.HasField("inversion"):
            continue
        sp = rec.inversion.spearman
        points.append(
            TrajectoryPoint(
                step=int(rec.step),
                rho=_opt(sp, "value"),
                ci_low=_opt(sp, "ci_low"),
                ci_high=_opt(sp, "ci_high"),
                entropy_mean=_opt(rec.entropy, "mean"),
                entropy_p10=_opt(rec.entropy, "p10"),
                entropy_p50=_opt(rec.entropy, "p50"),
                entropy_p90=_opt(rec.entropy, "p90"),
                score_mean=_opt(rec.score, "mean"),
            )
        )
    return points


def _num(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}" if math.isfinite(value) else "n/a"


def _pos(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def format_point(point: TrajectoryPoint) -> str:
    """``step 40  rho -0.412 [-0.55, -0.25]  entropy 1.234``."""
    return (
        f"step {point.step:>5}  rho {_num(point.rho)} "
        f"[{_num(point.ci_low, 2)}, {_num(point.ci_high, 2)}]  "
        f"entropy {_pos(point.entropy_mean)}"
    )


def pick(points: Sequence[TrajectoryPoint], count: int) -> list[TrajectoryPoint]:
    """At most ``count`` points spread evenly, always the first and the last."""
    if len(points) <= count:
        return list(points)
    idx = sorted({round(i * (len(points) - 1) / (count - 1)) for i in range(count)})
    return [points[i] for i in idx]


def format_alerts(alerts: Sequence[monitor_pb2.Alert]) -> list[str]:
    """One line per alert: state, name, severity, steps, summary."""
    lines = []
    for alert in alerts:
        state = "ACTIVE  " if alert.active else "resolved"
        end = "" if alert.active else f"-{alert.end_step}"
        lines.append(
            f"{state} {alert.name} ({alert.severity}) steps {alert.start_step}{end}: "
            f"{alert.summary}"
        )
    return lines


def format_summary(response: monitor_pb2.GetRunResponse, *, rows: int = 8) -> str:
    """The terminal summary of one run: trajectory, entropy change and alerts."""
    points = trajectory(response.history)
    run = response.summary
    lines = [
        f"run {run.display_name} ({run.run.run_id}), {run.status}, {run.records} records stored"
    ]
    if not points:
        lines.append("no records stored")
    else:
        lines.append("rho (Spearman of entropy vs gradient strength) over training:")
        lines.extend("  " + format_point(p) for p in pick(points, rows))
        first, last = points[0], points[-1]
        lines.append(
            f"entropy mean: {_pos(first.entropy_mean)} at step {first.step} -> "
            f"{_pos(last.entropy_mean)} at step {last.step}"
        )
    alerts = format_alerts(response.alerts)
    lines.append(f"alerts: {len(alerts)}" + ("" if alerts else " (none raised)"))
    lines.extend("  " + a for a in alerts)
    return "\n".join(lines)


# ---------------------------------------------------------------- HTML


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_report(
    title: str, summary_text: str, images: dict[str, str], notes: Sequence[str] = ()
) -> str:
    """A self-contained HTML page: the summary as text and each plot as an inline PNG."""
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in images.items()
    )
    extra = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "pre{background:#f4f4f4;padding:1em;overflow-x:auto}"
        "figure{display:inline-block;margin:1em}img{max-width:100%}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{extra}<pre>{html.escape(summary_text)}</pre>"
        f"{figures}</body></html>\n"
    )


# ---------------------------------------------------------------- the demo's phases


@dataclass(frozen=True)
class RLPoint:
    """The RL signals of one stored record (NaN where the record has none).

    >>> RLPoint(3, 0.5, 1.2, -0.01).reward_mean
    0.5
    """

    step: int
    reward_mean: float
    policy_entropy_mean: float
    entropy_covariance: float


def rl_trajectory(records: Sequence[monitor_pb2.StepRecord]) -> list[RLPoint]:
    """One point per rank-0 record, in step order."""
    return [
        RLPoint(
            int(rec.step),
            _opt(rec, "reward_mean"),
            _opt(rec, "policy_entropy_mean"),
            _opt(rec, "entropy_covariance"),
        )
        for rec in sorted(records, key=lambda r: r.step)
        if rec.rank == 0
    ]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def format_phase_summary(title: str, response: monitor_pb2.GetRunResponse) -> str:
    """A phase's summary: the run's trajectory and alerts, and its RL signals if it has any.

    RL signals are shown as means over the first and the last fifth of the run.
    """
    lines = [f"== {title} ==", format_summary(response, rows=5)]
    rl = [p for p in rl_trajectory(response.history) if math.isfinite(p.reward_mean)]
    if rl:
        k = max(1, len(rl) // 5)
        head, tail = rl[:k], rl[-k:]
        span = f"steps {head[0].step}-{head[-1].step} -> {tail[0].step}-{tail[-1].step}"
        for label, attr in (
            ("reward mean", "reward_mean"),
            ("policy entropy", "policy_entropy_mean"),
            ("Cov(log pi, A)", "entropy_covariance"),
        ):
            first = _mean([getattr(p, attr) for p in head])
            last = _mean([getattr(p, attr) for p in tail])
            lines.append(f"{label}: {_num(first, 4)} -> {_num(last, 4)} ({span})")
    return "\n".join(lines)


DemoPhase = tuple[str, str, "int | None", "monitor_pb2.GetRunResponse"]
"""``(title, what was done, step of the learning-rate jump or None, GetRun)``."""


def _alert_steps(response: monitor_pb2.GetRunResponse) -> list[tuple[int, str]]:
    return [(int(a.start_step), a.name) for a in response.alerts]


def _mark(ax: Any, jump: int | None, alerts: Sequence[tuple[int, str]]) -> None:
    if jump is not None:
        ax.axvline(jump, color="orange", linestyle=":", label=f"lr jump (step {jump})")
    for step, name in alerts:
        ax.axvline(step, color="red", linestyle="--", label=f"{name} (step {step})")


def demo_plot_images(phases: Sequence[DemoPhase]) -> dict[str, str]:
    """Title -> base64 PNG: rho with its band, entropy, reward and covariance, per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, str] = {}
    n = len(phases)

    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False, sharey=True)
    for ax, (title, _, jump, response) in zip(axes[0], phases, strict=True):
        points = trajectory(response.history)
        steps = [p.step for p in points]
        ax.fill_between(
            steps,
            [p.ci_low for p in points],
            [p.ci_high for p in points],
            alpha=0.3,
            label="95% CI",
        )
        ax.plot(steps, [p.rho for p in points], marker=".", label="Spearman rho")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        _mark(ax, jump, _alert_steps(response))
        ax.set(title=title, xlabel="step", ylim=(-1.05, 1.05))
        ax.legend(loc="best", fontsize="small")
    axes[0][0].set_ylabel("rho (entropy vs gradient strength)")
    images["rho with its 95% confidence band, per phase"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False)
    for ax, (title, _, jump, response) in zip(axes[0], phases, strict=True):
        points = trajectory(response.history)
        steps = [p.step for p in points]
        ax.fill_between(
            steps,
            [p.entropy_p10 for p in points],
            [p.entropy_p90 for p in points],
            alpha=0.25,
            label="probe p10-p90",
        )
        ax.plot(steps, [p.entropy_mean for p in points], label="probe mean")
        rl = rl_trajectory(response.history)
        if any(math.isfinite(p.policy_entropy_mean) for p in rl):
            ax.plot(
                [p.step for p in rl],
                [p.policy_entropy_mean for p in rl],
                label="policy (completions)",
            )
        _mark(ax, jump, _alert_steps(response))
        ax.set(title=title, xlabel="step")
        ax.legend(loc="best", fontsize="small")
    axes[0][0].set_ylabel("per-token entropy (nats)")
    images["per-token entropy, per phase"] = _png(fig)
    plt.close(fig)

    rl_phases = [
        ph
        for ph in phases
        if any(math.isfinite(p.reward_mean) for p in rl_trajectory(ph[3].history))
    ]
    if rl_phases:
        for key, attr, label in (
            ("reward of the RL phases", "reward_mean", "reward mean"),
            (
                "Cov(log pi, A) of the RL phases (Cui et al.)",
                "entropy_covariance",
                "covariance",
            ),
        ):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for title, _, jump, response in rl_phases:
                rl = rl_trajectory(response.history)
                ax.plot([p.step for p in rl], [getattr(p, attr) for p in rl], label=title)
                _mark(ax, jump, _alert_steps(response))
            if attr == "entropy_covariance":
                ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set(xlabel="step", ylabel=label)
            ax.legend(loc="best", fontsize="small")
            images[key] = _png(fig)
            plt.close(fig)
    return images


def demo_html_report(
    phases: Sequence[DemoPhase],
    images: dict[str, str],
    *,
    received: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The demo's self-contained page: each phase, the alerts the webhook got, the plots."""
    sections = []
    for i, (title, what, _, response) in enumerate(phases, 1):
        sections.append(
            f"<h2>Phase {i}: {html.escape(title)}</h2><p>{html.escape(what)}</p>"
            f"<pre>{html.escape(format_phase_summary(title, response))}</pre>"
        )
    webhook = (
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in received) + "</ul>"
        if received
        else "<p>none</p>"
    )
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in images.items()
    )
    extra = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>inversion-monitor demo</title><style>"
        "body{font-family:sans-serif;max-width:80em;margin:2em auto;padding:0 1em}"
        "pre{background:#f4f4f4;padding:1em;overflow-x:auto}"
        "figure{margin:1em 0}img{max-width:100%}"
        "</style></head><body>"
        f"<h1>inversion-monitor demo</h1>{extra}"
        "<p>Three runs of a tiny Llama-style model on toy arithmetic, as the server stored "
        "them. The numbers are what the toy model did.</p>"
        f"{''.join(sections)}"
        f"<h2>Alerts received by the demo's webhook</h2>{webhook}"
        f"<h2>Plots</h2>{figures}</body></html>\n"
    )


def write_demo_report(
    phases: Sequence[DemoPhase],
    path: Path,
    *,
    received: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the demo's HTML report of its phases to ``path``; returns ``path``."""
    page = demo_html_report(phases, demo_plot_images(phases), received=received, notes=notes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
