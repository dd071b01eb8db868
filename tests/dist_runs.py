"""Launch a fixture script on 2 CPU processes (gloo) and read what each rank reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import MonitorServer
from tests.deepspeed_ops import build_environment, clear_stale_locks
from tests.server_support import free_port, stub_for

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class DistRun:
    """One finished 2-process job: its exit, output and per-scenario, per-rank reports."""

    proc: subprocess.CompletedProcess[str]
    out: Path

    def ok(self) -> DistRun:
        assert self.proc.returncode == 0, self.proc.stdout[-2000:] + self.proc.stderr[-6000:]
        return self

    def scenario(self, name: str) -> Scenario:
        reports = {}
        for rank in (0, 1):
            path = self.out / name / f"rank{rank}.json"
            assert path.exists(), f"no {path}: " + self.proc.stderr[-4000:]
            reports[rank] = json.loads(path.read_text())
        return Scenario(reports)


@dataclass
class Scenario:
    """What each rank reported of one training run of the job."""

    reports: dict[int, dict[str, Any]]

    def field(self, name: str) -> dict[int, Any]:
        return {rank: report[name] for rank, report in self.reports.items()}

    def assert_probed_together(
        self, server: MonitorServer, run: str, steps: list[int] | None = None
    ) -> None:
        """No warnings; the same probe steps on both ranks (``steps`` if given) and at
        ``server`` under one run id; values within 1e-4 of the unsharded reference."""
        assert self.field("warnings") == {0: [], 1: []}
        probed = self.field("probe_steps")
        assert probed[0] == probed[1] and (steps is None or probed[0] == steps), probed
        assert server_steps(server, run) == probed  # every rank's records, one run
        assert len(set(self.field("run_id").values())) == 1
        for error in self.field("reference_error").values():
            assert error is not None and error <= 1e-4

    def assert_training_like(self, reference: Scenario, steps: int) -> None:
        """Loss history and final weights bit-identical to ``reference``'s."""
        assert len(reference.field("losses")[0]) == steps
        assert self.field("losses") == reference.field("losses")
        assert self.field("weights") == reference.field("weights")


def torchrun(
    script: str,
    out: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> DistRun:
    """``torchrun --nproc_per_node 2 fixtures/SCRIPT OUT ARGS...`` on loopback."""
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
        str(FIXTURES / script),
        str(out),
        *args,
    ]
    return launch(command, out, env=env, timeout=timeout)


def accelerate_zero3(script: str, out: Path, *args: str) -> list[str]:
    """``accelerate launch`` of ``fixtures/SCRIPT OUT ARGS...`` with the 2-process ZeRO-3
    config (``fixtures/accelerate/zero3.yaml``) on a free port: the command, not yet run."""
    return [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(FIXTURES / "accelerate" / "zero3.yaml"),
        "--main_process_port",
        str(free_port()),
        str(FIXTURES / script),
        str(out),
        *args,
    ]


def launch(
    command: list[str], out: Path, *, env: dict[str, str] | None = None, timeout: float = 240
) -> DistRun:
    """Run ``command`` (a 2-process launcher) writing its reports under ``out``. Past
    ``timeout`` seconds the launcher and every rank it started are killed and the run
    comes back failed (return code -9) with what they printed."""
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INVERSION_MONITOR_")},
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **build_environment(),
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    proc = subprocess.Popen(
        command,
        env=full_env,
        cwd=ROOT,  # config files name paths from the repository root
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: the launcher and its ranks
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        stdout, stderr = proc.communicate()
        clear_stale_locks()
        stderr += f"\n[tests.dist_runs: killed after {timeout:.0f} s]"
    return DistRun(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), out)


def spawn_ranks(fn: Callable[..., None], args: tuple[Any, ...], timeout: float = 420) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs=2)`` that gives up after ``timeout``
    seconds: a rank that fails raises here, and no rank outlives the call (a rank left
    running would hang the test session's exit, which joins its children)."""
    context = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=min(5.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
    finally:
        alive = [p for p in context.processes if p.is_alive()]
        for process in alive:
            process.kill()
        for process in alive:
            process.join(10)
        if alive:
            clear_stale_locks()


def server_steps(server: MonitorServer, run: str) -> dict[int, list[int]]:
    """Probe steps the server holds for ``run``, by rank (the per-step health records
    without inversion statistics are left out)."""
    with stub_for(server) as stub:
        reply = stub.GetRun(monitor_pb2.GetRunRequest(run=run, history_limit=1000), timeout=10)
    steps: dict[int, list[int]] = {}
    for record in reply.history:
        if record.HasField("inversion"):
            steps.setdefault(int(record.rank), []).append(int(record.step))
    assert reply.summary.run.world_size == 2
    return {rank: sorted(values) for rank, values in steps.items()}


def monitor_env(server: MonitorServer, run_name: str, **settings: Any) -> dict[str, str]:
    """INVERSION_MONITOR_* variables: this server, this run name (suffixed with each
    scenario's name) and ``settings``."""
    env = {
        "INVERSION_MONITOR_ENDPOINT": server.grpc_target,
        "INVERSION_MONITOR_RUN_NAME": run_name,
        "INVERSION_MONITOR_TOKENS_PER_PROBE": "16",
    }
    env.update({f"INVERSION_MONITOR_{k.upper()}": str(v) for k, v in settings.items()})
    return env
