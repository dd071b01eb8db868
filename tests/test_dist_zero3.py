"""HF Trainer with DeepSpeed ZeRO-3 (``deepspeed=`` config) on 2 CPU processes.

One torchrun job trains twice, without and with the monitor probing every
second step; records go to a real server on loopback. DeepSpeed runs on CPU
with ``DS_ACCELERATOR=cpu`` and gloo.
"""

from __future__ import annotations

import pytest

from inversion_monitor.server import MonitorServer
from tests.dist_runs import DistRun, monitor_env, torchrun

STEPS = 4


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory, dist_server: MonitorServer, deepspeed_ops: None
) -> DistRun:
    return torchrun(
        "hf_dist_train.py",
        tmp_path_factory.mktemp("zero3"),
        "--steps",
        str(STEPS),
        "--scenarios",
        "none,every",
        "--zero3",
        env=monitor_env(dist_server, "zero3"),
    ).ok()


@pytest.mark.slow
def test_training_is_unchanged_by_the_monitor(job: DistRun) -> None:
    job.scenario("every").assert_training_like(job.scenario("none"), STEPS)


@pytest.mark.slow
def test_every_rank_probes_partitioned_weights_exactly(
    job: DistRun, dist_server: MonitorServer
) -> None:
    job.scenario("every").assert_probed_together(dist_server, "zero3-every", [2, 4])
