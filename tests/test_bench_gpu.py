"""benchmarks/bench_gpu.py: refuses clearly without CUDA; its dry run runs every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_gpu import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def test_without_cuda_it_fails_clearly(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(  # no device visible, on any machine
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


def check_probe(figures: dict[str, Any]) -> None:
    steps = figures["steps"]
    assert steps[0]["steps"] == 1.0 and all(r["seconds"] > 0 for r in steps)
    assert figures["entropy_memory"]["chunked"]["logits_bytes"] == 2 * 64 * 512 * 2


def check_probe_counts(figures: dict[str, Any]) -> None:
    for shape in ("small", "0.5b"):
        counts = figures[shape]["targets"]
        assert set(counts) == {"8", "16"} and all(r["ops"] > 0 for r in counts.values())


def check_memory_goal(figures: dict[str, Any]) -> None:
    lengths = figures["lengths"]
    assert [r["T"] for r in lengths] == [64, 128]
    assert all(c["extra_bytes"] > 0 for r in lengths for c in r["calls"])
    # the figure says which path produced it: the captured last-block one
    assert all(
        c["paths"] == ["last_block"] and c["prefix"] == "captured"
        for r in lengths
        for c in r["calls"]
    )
    assert figures["fast_path"]


def check_scaling(figures: dict[str, Any]) -> None:
    assert len(figures["points"]) == 3 and len(figures["long_context"]["rows"]) == 2
    assert all(p["layer_flops_counted"] > 0 for p in figures["points"])
    assert figures["model"]["max_rel_err"] >= 0


def check_overhead(figures: dict[str, Any]) -> None:
    assert "every step" in figures["table"] and "health only" in figures["table"]


def check_general_path(figures: dict[str, Any]) -> None:
    assert figures["rows"] and figures["rows"][0]["batched_ms"] > 0


def check_stats(figures: dict[str, Any]) -> None:
    assert "spearman" in figures["table"] and "entropy_covariance" in figures["table"]


def check_sharded(figures: dict[str, Any]) -> None:
    assert figures["rows"] and "unsharded_s" in figures["rows"][0]


CHECKS = {
    "probe": check_probe,
    "probe_counts": check_probe_counts,
    "memory_goal": check_memory_goal,
    "overhead": check_overhead,
    "general_path": check_general_path,
    "stats": check_stats,
    "sharded": check_sharded,
    "scaling": check_scaling,
}


def test_every_section_has_a_check():
    assert set(CHECKS) == set(SECTIONS)


@pytest.mark.timeout(1500)  # a section's own process: a few CPU minutes on a loaded machine
@pytest.mark.parametrize("section", list(SECTIONS))
def test_dry_run_runs_the_section_on_cpu(tmp_path, section):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--sections", section],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    report = json.loads(out.read_text())
    result = report["sections"][section]
    assert proc.returncode == 0, (result.get("error"), proc.stdout[-2000:])
    assert report["dry_run"] is True and result["ok"] and result["figures"] is not None
    CHECKS[section](result["figures"])
