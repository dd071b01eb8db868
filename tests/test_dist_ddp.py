"""HF Trainer DDP on 2 CPU processes: the ranks probe together, fail together, never hang.

One torchrun job trains five times (see tests/fixtures/dist_support.py):
without the monitor, with the time budget, with a probe failure on rank 1
(before and after the ranks commit to a probe) and with rank 1 late for a
vote. Records go to a real server on loopback; each run is compared with the
one without the monitor (loss history and final weights bit-identical).
"""

from __future__ import annotations

import pytest

from inversion_monitor.server import MonitorServer
from tests.dist_runs import DistRun, monitor_env, server_steps, torchrun

STEPS = 8


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, dist_server: MonitorServer) -> DistRun:
    return torchrun(
        "hf_dist_train.py",
        tmp_path_factory.mktemp("ddp"),
        "--steps",
        str(STEPS),
        "--scenarios",
        "none,budget,raise,raise_in_probe,stall",
        env=monitor_env(dist_server, "ddp"),
    ).ok()


@pytest.mark.slow
def test_budget_schedule_probes_on_the_same_steps_on_every_rank(
    job: DistRun, dist_server: MonitorServer
) -> None:
    run = job.scenario("budget")
    run.assert_probed_together(dist_server, "ddp-budget")
    assert len(run.field("probe_steps")[0]) >= 2
    assert run.field("enabled") == {0: True, 1: True}
    run.assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
def test_a_failure_on_one_rank_disables_every_rank_together(
    job: DistRun, dist_server: MonitorServer
) -> None:
    run = job.scenario("raise")
    assert run.field("probe_steps") == {0: [1, 2], 1: [1, 2]}
    assert server_steps(dist_server, "ddp-raise") == {0: [1, 2], 1: [1, 2]}
    assert run.field("probing") == {0: False, 1: False}
    assert run.field("enabled") == {0: True, 1: True}  # the health records go on
    warnings = run.field("warnings")
    assert len(warnings[1]) == 1 and "injected failure on this rank" in warnings[1][0]
    assert "every rank" in warnings[1][0]
    assert len(warnings[0]) == 1 and "failed on rank 1" in warnings[0][0], warnings
    run.assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
def test_a_failure_inside_the_probe_disables_every_rank_at_the_next_vote(
    job: DistRun, dist_server: MonitorServer
) -> None:
    run = job.scenario("raise_in_probe")
    # rank 0 finished the probe of step 3; rank 1's failure reached it with the next vote
    assert run.field("probe_steps") == {0: [1, 2, 3], 1: [1, 2]}
    assert server_steps(dist_server, "ddp-raise_in_probe") == {0: [1, 2, 3], 1: [1, 2]}
    assert run.field("probing") == {0: False, 1: False}
    assert run.field("enabled") == {0: True, 1: True}  # the health records go on
    warnings = run.field("warnings")
    assert len(warnings[1]) == 1 and "injected failure on this rank" in warnings[1][0]
    assert len(warnings[0]) == 1 and "failed on rank 1" in warnings[0][0], warnings
    run.assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
def test_a_rank_late_for_the_vote_switches_the_monitor_off_instead_of_hanging(
    job: DistRun, dist_server: MonitorServer
) -> None:
    run = job.scenario("stall")
    # neither rank probed step 3 alone: the late rank read the verdict the others left
    assert run.field("probe_steps") == {0: [1, 2], 1: [1, 2]}
    assert server_steps(dist_server, "ddp-stall") == {0: [1, 2], 1: [1, 2]}
    assert run.field("probing") == {0: False, 1: False}
    assert run.field("enabled") == {0: True, 1: True}  # the health records go on
    for messages in run.field("warnings").values():
        assert len(messages) == 1 and "agreement_timeout_s=1.5" in messages[0], messages
    run.assert_training_like(job.scenario("none"), STEPS)
