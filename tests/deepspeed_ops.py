"""DeepSpeed's CPU shared-memory op, built once before any test starts DeepSpeed ranks.

Every DeepSpeed process on the CPU accelerator loads ``deepspeed_shm_comm`` through
torch's JIT extension loader. The loader guards the build folder with a bare lock file:
held for the whole build (tens of seconds on a fresh machine, compiled by whichever rank
gets there first) and again, briefly, on every later load. A process killed while it holds
the file leaves it behind, and every later rank then waits on it forever (a CI run hung so).

So the tests build the op here, in one process of their own, into this checkout's
``build/torch_extensions`` (``EXTENSIONS_DIR``, which every launch passes on as
``TORCH_EXTENSIONS_DIR``), under an ``flock`` that the kernel drops with its holder; and
whoever kills ranks clears the lock files they may have left (``clear_stale_locks``).
Tests run one at a time in a checkout, so no live rank owns a lock file at those points.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS_DIR = ROOT / "build" / "torch_extensions"
BUILD_TIMEOUT_S = 480.0  # ~40 s cold on 2 idle cores; within the tests' 600 s limit

_BUILD = (
    "from deepspeed.comm.torch import build_shm_op\n"
    "op = build_shm_op()\n"
    "print('deepspeed_shm_comm:', 'built' if op is not None else 'not compatible here')\n"
)


def clear_stale_locks() -> None:
    """Remove torch's build lock files under ``EXTENSIONS_DIR``: call only when no process
    that could hold one is alive (its ranks were killed, or none was started yet)."""
    for lock in EXTENSIONS_DIR.glob("*/lock"):
        lock.unlink(missing_ok=True)


def build_environment() -> dict[str, str]:
    """The variables a DeepSpeed process of the tests runs with: CPU accelerator, the
    checkout's extension folder."""
    return {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR)}


def build_shm_op() -> str:
    """Build (or find built) the op; return the builder's output. Raises ``RuntimeError``
    with that output when the build fails or outlives ``BUILD_TIMEOUT_S``."""
    EXTENSIONS_DIR.mkdir(parents=True, exist_ok=True)
    with open(EXTENSIONS_DIR / ".build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # another test session of this checkout builds: wait
        clear_stale_locks()  # under the flock, nothing alive holds one
        proc = subprocess.Popen(
            [sys.executable, "-c", _BUILD],
            env={**os.environ, **build_environment(), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its compiler processes die with it
        )
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            clear_stale_locks()
            raise RuntimeError(
                f"building deepspeed_shm_comm took over {BUILD_TIMEOUT_S:.0f} s:\n{output[-4000:]}"
            ) from None
        if proc.returncode != 0:
            clear_stale_locks()
            raise RuntimeError(f"building deepspeed_shm_comm failed:\n{output[-4000:]}")
        return output
