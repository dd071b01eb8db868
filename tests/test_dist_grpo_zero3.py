"""TRL GRPO with CorR-PO under DeepSpeed ZeRO-3: `accelerate launch`, 2 CPU processes.

One job (tests/fixtures/grpo_zero3_train.py) trains twice, with CorR-PO
shaping the rewards both times: without the monitor and with it probing every
second step. Records go to a real server on loopback.
"""

from __future__ import annotations

import pytest

from inversion_monitor.server import MonitorServer
from tests.dist_runs import DistRun, accelerate_zero3, launch, monitor_env

STEPS = 4


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory, dist_server: MonitorServer, deepspeed_ops: None
) -> DistRun:
    out = tmp_path_factory.mktemp("grpo-zero3")
    command = accelerate_zero3(
        "grpo_zero3_train.py", out, "--steps", str(STEPS), "--scenarios", "none,every"
    )
    return launch(command, out, env=monitor_env(dist_server, "grpo-zero3")).ok()


@pytest.mark.slow
def test_training_is_unchanged_by_the_monitor(job: DistRun) -> None:
    job.scenario("every").assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["none", "every"])
def test_corrpo_rho_on_partitioned_weights_equals_the_unsharded_policy(
    job: DistRun, scenario: str
) -> None:
    run = job.scenario(scenario)
    assert run.field("process_index") == {0: 0, 1: 1}  # accelerate counts both processes
    for rank, errors in run.field("rho_errors").items():
        assert len(errors) == STEPS, (rank, errors)  # one generation batch per step
        assert max(errors) <= 1e-6, (rank, errors)
    assert all(count > 0 for count in run.field("rho_measured").values())


@pytest.mark.slow
def test_every_rank_probes_partitioned_weights_exactly(
    job: DistRun, dist_server: MonitorServer
) -> None:
    job.scenario("every").assert_probed_together(dist_server, "grpo-zero3-every", [2, 4])
