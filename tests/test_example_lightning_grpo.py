"""The Lightning GRPO + CorR-PO example runs end to end (a few steps, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow


def load_example() -> ModuleType:
    return importlib.import_module("inversion_monitor.app.examples.lightning_grpo_corrpo")


def test_example_trains_with_corrpo_and_the_monitor(tmp_path):
    example = load_example()
    path = tmp_path / "inversion.jsonl"
    history = example.main(3, coef=0.1, jsonl_path=str(path))
    assert [row["step"] for row in history] == [0.0, 1.0, 2.0]
    for row in history:
        assert math.isfinite(row["loss"]) and 0 <= row["reward"] <= 1
        assert 0 <= row["unshaped_fraction"] <= 1
    assert any(math.isfinite(row["rho_mean"]) for row in history)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # the monitor probed every optimizer step
    assert all(r["n"] > 0 for r in records)
    # the RL signals the step returned ride on the records (no extra forward)
    assert all(r["kind"] == "rl" for r in records)
    for rec in records:
        rl = rec["rl"]
        assert rl["policy_entropy_mean"] > 0 and math.isfinite(rl["entropy_covariance"])
        assert rl["steps"] == 1 and math.isfinite(rl["reward_mean"])


def test_task_reward_is_verifiable():
    example = load_example()
    assert example.task_reward("3+4=7.\nA: 7\n", 7) == 1.0
    assert example.task_reward("A: 8", 7) == 0.1
    assert example.task_reward("abc", 7) == 0.0
