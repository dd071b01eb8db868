"""FSDP2 (``fully_shard``) in a custom loop on 2 CPU processes: the probe on sharded weights.

One torchrun job trains three times: without the monitor, probing every
second step, and with the probe failing on rank 1 (see
tests/fixtures/dist_support.py). Records go to a real server on loopback.
"""

from __future__ import annotations

import pytest

from inversion_monitor.server import MonitorServer
from tests.dist_runs import DistRun, monitor_env, torchrun

STEPS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, dist_server: MonitorServer) -> DistRun:
    return torchrun(
        "fsdp2_train.py",
        tmp_path_factory.mktemp("fsdp2"),
        "--steps",
        str(STEPS),
        "--scenarios",
        "none,every,raise",
        env=monitor_env(dist_server, "fsdp2"),
    ).ok()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["every", "raise"])
def test_training_is_unchanged_by_the_monitor(job: DistRun, scenario: str) -> None:
    job.scenario(scenario).assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
def test_every_rank_probes_sharded_weights_exactly(
    job: DistRun, dist_server: MonitorServer
) -> None:
    job.scenario("every").assert_probed_together(dist_server, "fsdp2-every", [2, 4])


@pytest.mark.slow
def test_a_failure_on_one_rank_disables_every_rank_without_a_hang(job: DistRun) -> None:
    run = job.scenario("raise")
    assert run.field("probing") == {0: False, 1: False}
    assert run.field("enabled") == {0: True, 1: True}  # the health records go on
    warnings = run.field("warnings")
    assert len(warnings[1]) == 1 and "injected failure on this rank" in warnings[1][0], warnings
    assert len(warnings[0]) == 1 and "failed on rank 1" in warnings[0][0], warnings
    assert run.field("probe_steps") == {0: [1, 2], 1: [1, 2]}
