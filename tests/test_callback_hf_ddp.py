"""HF Trainer under torchrun with 2 CPU processes (gloo): both ranks report, one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inversion_monitor.proto.v1 import monitor_pb2
from tests.server_support import free_port, running, stub_for

SCRIPT = Path(__file__).parent / "fixtures" / "hf_ddp_train.py"
ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp_path: Path, steps: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        str(tmp_path / "out"),
        str(steps),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        command, env=full_env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_both_ranks_report_under_one_run_id(tmp_path):
    with running(tmp_path) as server:
        proc = torchrun(
            tmp_path,
            4,
            {
                "INVERSION_MONITOR_JSONL_PATH": str(tmp_path / "r.jsonl"),
                "INVERSION_MONITOR_RUN_NAME": "ddp-test",
                "INVERSION_MONITOR_ENDPOINT": server.grpc_target,
            },
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with stub_for(server) as stub:
            reply = stub.GetRun(
                monitor_pb2.GetRunRequest(run="ddp-test", history_limit=100), timeout=10
            )
    by_rank = {rank: sorted(r.step for r in reply.history if r.rank == rank) for rank in (0, 1)}
    assert by_rank == {0: [1, 2, 3, 4], 1: [1, 2, 3, 4]}
    assert reply.summary.run.world_size == 2
    records = {
        rank: [json.loads(line) for line in (tmp_path / f"r.rank{rank}.jsonl").open()]
        for rank in (0, 1)
    }
    for rank, rows in records.items():
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert {r["rank"] for r in rows} == {rank}
    run_ids = {r["run_id"] for rows in records.values() for r in rows}
    assert len(run_ids) == 1
    assert {r["run_name"] for rows in records.values() for r in rows} == {"ddp-test"}
