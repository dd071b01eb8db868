"""EntropyCollapse's sudden fall (RL policy entropy): the alert gives the level the record was
judged against."""

from __future__ import annotations

import math

import pytest

from inversion_monitor.server.detectors import AlertsConfig, EntropyCollapse, Observation


def test_the_alert_gives_the_level_the_fall_was_judged_against() -> None:
    """Forty records at 1.00 and 1.10 nats, then 0.2: judged against the median of
    log(h + 0.01) over the forty (1.049 nats, the floor taken out), the level the message and
    ``sudden_level`` give; the window's median after the fall was pushed (1.000) is not it."""
    det = EntropyCollapse(AlertsConfig().entropy)
    values = [1.0, 1.1] * 20 + [0.2]
    fired = [
        t
        for step, h in enumerate(values)
        if (t := det.update(Observation(step, float(step), policy_entropy_mean=h))) is not None
    ]
    assert [t.step for t in fired] == [40]
    judged = math.sqrt(1.01 * 1.11) - 0.01
    assert fired[0].values["sudden_level"] == pytest.approx(judged, rel=1e-12)
    assert f"fell suddenly from its level {judged:.3f} (0.19 x its level" in fired[0].message
