"""`inversion-monitor run -- accelerate launch --config_file zero3.yaml train.py`, 2 CPU ranks.

An unmodified HF Trainer script under DeepSpeed ZeRO-3 (tests/fixtures/accelerate),
once with the monitor attached by ``inversion-monitor run`` and once without;
records go to a real server on loopback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.dist_runs import accelerate_zero3, launch, server_steps
from tests.server_support import running

STEPS = "4"
EXE = str(Path(sys.executable).with_name("inversion-monitor"))


def accelerate(out: Path) -> list[str]:
    return accelerate_zero3("plain_sharded_train.py", out, STEPS)


def reports(out: Path) -> dict[int, dict[str, object]]:
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
def test_accelerate_zero3_workers_probe_together_and_train_unchanged(tmp_path: Path) -> None:
    launch(accelerate(tmp_path / "without"), tmp_path / "without").ok()
    with running(tmp_path) as server:
        command = [
            EXE,
            "run",
            "--endpoint",
            server.grpc_target,
            "--run-name",
            "accelerate-zero3",
            "--every-n-steps",
            "2",
            "--tokens-per-probe",
            "16",
            "--",
            *accelerate(tmp_path / "with"),
        ]
        stderr = launch(command, tmp_path / "with").ok().proc.stderr
        plain, monitored = reports(tmp_path / "without"), reports(tmp_path / "with")
        assert all("InversionTrainerCallback" in r["callbacks"] for r in monitored.values())
        assert [r["losses"] for r in monitored.values()] == [r["losses"] for r in plain.values()]
        assert [r["weights"] for r in monitored.values()] == [r["weights"] for r in plain.values()]
        assert "inversion-monitor failed" not in stderr, stderr[-3000:]
        assert server_steps(server, "accelerate-zero3") == {0: [2, 4], 1: [2, 4]}
