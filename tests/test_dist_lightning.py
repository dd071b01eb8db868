"""Lightning ``ModelParallelStrategy`` (FSDP2 via ``configure_model``) on 2 CPU processes.

Lightning's FSDP2 strategy runs on CPU with gloo; its ``DeepSpeedStrategy``
refuses any accelerator but CUDA, so it has no CPU test (README, "Sharded
training"). One job trains twice, without and with the monitor probing every
second step; records go to a real server on loopback.
"""

from __future__ import annotations

import sys

import pytest

from inversion_monitor.server import MonitorServer
from tests.dist_runs import FIXTURES, DistRun, launch, monitor_env
from tests.server_support import free_port

STEPS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, dist_server: MonitorServer) -> DistRun:
    out = tmp_path_factory.mktemp("lightning")
    command = [
        sys.executable,
        str(FIXTURES / "lightning_dist_train.py"),
        str(out),
        "--steps",
        str(STEPS),
        "--scenarios",
        "none,every",
    ]
    env = {**monitor_env(dist_server, "lightning"), "MASTER_PORT": str(free_port())}
    return launch(command, out, env=env).ok()


@pytest.mark.slow
def test_training_is_unchanged_by_the_monitor(job: DistRun) -> None:
    job.scenario("every").assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
def test_every_rank_probes_sharded_weights_exactly(
    job: DistRun, dist_server: MonitorServer
) -> None:
    job.scenario("every").assert_probed_together(dist_server, "lightning-every", [2, 4])
