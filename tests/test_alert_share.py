"""Adopting an alert raised on another server seeds this server's detector (alert_share.seed):
the detector's own end condition then ends the adopted alert where the stream went."""

from __future__ import annotations

from inversion_monitor.server.alert_share import seed
from inversion_monitor.server.detectors import AlertsConfig, Observation, RunDetectors


def _lengths(dets: RunDetectors, values: list[float], first: int) -> list[tuple[bool, str]]:
    out = []
    for step, n in enumerate(values, first):
        for t in dets.update(Observation(step, 0.0, completion_length_mean=n)):
            out.append((t.firing, t.message))
    return out


def test_a_seeded_drift_detector_ends_the_adopted_alert_in_the_direction_it_fired() -> None:
    """LengthDrift watches both ways: the seeded one takes the direction of the alert's
    summary and ends once the length is back at its (fresh) level."""
    fired = RunDetectors(AlertsConfig(), kind="rl")  # the server where it fired
    healthy = [40.0, 42.0, 38.0, 41.0, 39.0, 40.0, 43.0, 40.0] * 2
    assert _lengths(fired, [*healthy, 12.0, 8.0, 5.0, 4.0], 0)[0][0]  # collapsing: fires
    adopted = RunDetectors(AlertsConfig(), kind="rl")  # where the stream went
    assert seed(adopted, "LengthDrift", 18, "Completion length collapsing")
    ended = _lengths(adopted, healthy, 20)
    assert len(ended) == 1 and not ended[0][0] and "the fall began at step 18" in ended[0][1]
    # without the seed the same records end nothing: the alert would stay until retention
    assert _lengths(RunDetectors(AlertsConfig(), kind="rl"), healthy, 20) == []


def test_seeding_the_stale_check_and_an_alert_whose_detector_is_off_here() -> None:
    dets = RunDetectors(AlertsConfig(), kind="sft")
    assert seed(dets, "MonitorStale", 5, "Monitor stale") and dets.stale is not None
    recovered = dets.stale.check(now=100.0, last_update=99.0, step=6, open_run=True)
    assert recovered is not None and not recovered.firing
    off = AlertsConfig.model_validate({"reward_collapse": {"enabled": False}})
    assert not seed(RunDetectors(off, kind="rl"), "RewardCollapse", 5, "Reward collapse")
