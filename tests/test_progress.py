"""The demo's progress output: one updating line on a terminal, plain lines in a pipe.

Each test runs a child process whose stdout is a real pipe or a real
pseudo-terminal and reads back the exact bytes it wrote.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

STEPS = 250
# what the demo does: a detail text after some probes, close at the end
CHILD = f"""
from inversion_monitor.app.progress import ProgressLine
line = ProgressLine({STEPS}, label="training", refresh_s=0.0)
for step in range(1, {STEPS} + 1):
    line.update(step, f"rho -0.{{step % 10}}00" if step % 8 == 0 else None)
line.close()
print("after")
"""


def _run_in_pipe() -> bytes:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, timeout=60, check=True
    )
    return result.stdout


def _run_in_pty() -> bytes:
    main, child_side = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=child_side, stderr=subprocess.PIPE, close_fds=True
    )
    os.close(child_side)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(main)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""
    return output


def test_in_a_pipe_it_prints_plain_periodic_lines() -> None:
    output = _run_in_pipe()
    assert b"\r" not in output and b"\x1b" not in output
    lines = output.decode().splitlines()
    assert lines[-1] == "after"
    progress = lines[:-1]
    assert len(progress) == 10  # one line per tenth of the run
    assert progress[0] == "training: step 25/250 (10%)  rho -0.400"
    assert progress[-1] == "training: step 250/250 (100%)  rho -0.800"
    steps = [
        int(m.group(1)) for m in (re.match(r"training: step (\d+)/", p) for p in progress) if m
    ]
    assert steps == list(range(25, 251, 25))


def test_on_a_terminal_it_updates_one_line_in_place() -> None:
    output = _run_in_pty().decode()
    # the terminal turns "\n" into "\r\n"; the progress itself uses "\r" and erase-to-end
    text = output.replace("\r\n", "\n")
    progress, after = text.rsplit("\n", 2)[0], text.rsplit("\n", 2)[1]
    assert after == "after"
    assert "\n" not in progress  # one line, rewritten
    frames = [f.removesuffix("\x1b[K") for f in progress.split("\r") if f]
    assert len(frames) > 10
    assert all(f.startswith("training: step ") for f in frames)
    assert frames[-1].startswith("training: step 250/250 (100%)")
    assert frames[-1].endswith("rho -0.800")
    assert re.search(r"\d+\.\d step/s", frames[-1])
