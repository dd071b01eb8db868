"""GradNormSpike: a lone record never fires, a sustained rise does; growing spikes fire on
the second spike."""

from __future__ import annotations

from inversion_monitor.server.detectors import AlertsConfig, GradNormSpike
from tests.health_streams import firings, lognormal


def test_a_lone_grad_norm_record_never_fires_a_sustained_rise_does() -> None:
    """Healthy RL runs of the failure corpus (its build on a second machine) had lone records
    13x and 16x their level (robust z +13, +16), back at the level on the next record: quiet.
    A learning-rate jump keeps the grad norm up: 8x for good fires on its second or third
    record (two in a row over the threshold, each at 2x the level or more; the budget is
    three), 1.5x for good stays quiet (the loss, rising too, fires on the first: with_loss_z)."""
    for seed in range(20):
        base = lognormal(1.0, 0.2, 60, seed)
        for spike in (13.0, 16.0, 40.0):
            values = [*base[:40], spike, *base[40:]]
            assert firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", values) == []
        jump = [*base[:40], *(8.0 * v for v in base[40:])]
        fired = firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", jump)
        assert fired[:1] in ([41], [42]), (seed, fired)
        drift = [*base[:40], *(1.5 * v for v in base[40:])]
        assert firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", drift) == []


def test_growing_grad_norm_spikes_fire_on_the_second_spike() -> None:
    """Spikes "higher and higher" (x3, then x4.5 four records later): the second fires though
    neither alone is out far enough for the CUSUM; either spike alone does not fire."""
    for seed in range(20):
        base = lognormal(1.0, 0.15, 64, seed)

        def run(first: float, second: float, base: list[float] = base) -> list[int]:
            values = list(base)
            values[40], values[44] = first, second
            return firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", values)

        assert run(3.0, 4.5) == [44], seed
        assert run(3.0, 1.0) == [] and run(1.0, 3.0) == [], seed


def test_growing_grad_norm_spikes_fire_when_noise_shrinks_the_growth_to_1_25() -> None:
    """The synthetic benchmark's late trial (syn-grad_spikes_growing-t3): a first spike that
    noise took to 3.2x the level, then a second only 1.25 x it (x3 then x7 on noisy records);
    neither is out far enough for the CUSUM alone, the growth fires on the second spike (at
    1.3 x it fired only on the third, 8 records after the first)."""
    for seed in range(20):
        values = lognormal(1.0, 0.15, 64, seed)
        values[40], values[44] = 3.2, 4.0
        assert firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", values) == [
            44
        ], seed
