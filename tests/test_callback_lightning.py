"""InversionLightningCallback in real Lightning runs on tiny models (CPU)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from inversion_monitor.callbacks import InversionLightningCallback
from tests.lightning_runs import TinyCausalLM, train_loader, trainer, weights

ROOT = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _probed(path: Path) -> list[dict[str, Any]]:
    """The records that carry the probe's statistics (the others carry health only)."""
    return [r for r in _records(path) if r["probed"]]


def _csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def _monitor_warnings(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


def test_probes_on_schedule_and_reaches_logger_and_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    callback = InversionLightningCallback(
        every_n_steps=3, tokens_per_probe=16, jsonl_path=str(path)
    )
    pl.seed_everything(0, verbose=False)
    run = trainer(tmp_path, callbacks=[callback], max_steps=9, log_every_n_steps=3)
    run.fit(TinyCausalLM(), train_loader(9))

    every = _records(path)
    assert [r["step"] for r in every] == list(range(1, 10))  # one health record a step
    assert all(r["loss"] > 0 and r["learning_rate"] == pytest.approx(2e-3) for r in every)
    records = _probed(path)
    assert [r["step"] for r in records] == [3, 6, 9]
    assert {r["run_id"] for r in every} == {records[0]["run_id"]}
    assert all(r["rank"] == 0 and r["n"] == 16 for r in records)
    assert records[0]["run_name"] == "logs/version_0"  # from the CSVLogger
    assert all(r["kind"] == "custom" and "rl" not in r for r in records)  # Lightning default

    rows = _csv_rows(tmp_path)
    probed = [row for row in rows if row.get("inversion/spearman")]
    assert len(probed) == 3
    for row, record in zip(probed, records, strict=True):
        assert float(row["inversion/spearman"]) == pytest.approx(record["spearman"])
        assert float(row["inversion/n"]) == 16
    # on the step axis of the same batch's loss (Lightning counts from 0)
    loss_steps = {row["step"] for row in rows if row.get("train_loss")}
    assert [row["step"] for row in probed] == ["2", "5", "8"]
    assert {row["step"] for row in probed} <= loss_steps

    assert "inversion/spearman" in run.callback_metrics
    assert callback.monitor is None  # closed at train end
    assert callback.state_dict()["monitor"]["probes"] == 3


class _Losses(pl.Callback):  # type: ignore[misc]
    """Every micro-batch's loss, as training computed it."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
        self.values.append(float(outputs["loss"].detach()))


@pytest.mark.parametrize(
    ("arch", "prefix"),
    [
        # with dropout: the RNG stream must be left alone; the prefix is recomputed
        ("gpt2", "recomputed: dropout is active (Dropout, p=0.1)"),
        # probed in on_before_optimizer_step from the last micro-batch's hidden states
        ("llama", "captured"),
    ],
)
def test_one_probe_per_optimizer_step_and_bit_identical_weights(
    tmp_path: Path, arch: str, prefix: str
) -> None:
    def fit(callbacks: list[Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
        pl.seed_everything(0, verbose=False)
        module = TinyCausalLM(arch)
        losses = _Losses()
        run = trainer(
            None,
            callbacks=[*callbacks, losses],
            max_steps=4,
            accumulate_grad_batches=2,
            deterministic=True,
        )
        run.fit(module, train_loader(8))
        assert run.global_step == 4 and run.fit_loop.total_batch_idx == 7  # 8 micro-batches
        return losses.values, weights(module)

    path = tmp_path / "records.jsonl"
    plain_losses, plain = fit([])
    callback = InversionLightningCallback(
        every_n_steps=1, layers=[0, -1], tokens_per_probe=16, jsonl_path=str(path)
    )
    losses, monitored = fit([callback])
    records = _records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # not once per micro-batch
    assert {r["prefix"] for r in records} == {prefix}
    # each record carries the mean loss of its step's micro-batches
    step_losses = [(a + b) / 2 for a, b in zip(plain_losses[::2], plain_losses[1::2], strict=True)]
    assert [r["loss"] for r in records] == pytest.approx(step_losses, rel=1e-6)
    assert losses == plain_losses
    assert plain.keys() == monitored.keys()
    for key in plain:
        assert torch.equal(plain[key], monitored[key]), key


@pytest.mark.slow
def test_ddp_two_ranks_send_their_own_records(tmp_path: Path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free one
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lightning_runs", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 joins this group: one kill ends both
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"DDP run did not finish in 300 s:\n{output[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any straggler of the group
    assert proc.returncode == 0, output[-4000:]
    assert (tmp_path / "done").read_text() == "6"

    by_rank = {rank: _probed(tmp_path / f"records.rank{rank}.jsonl") for rank in (0, 1)}
    for rank, records in by_rank.items():
        assert records, f"rank {rank} sent nothing"
        assert {r["rank"] for r in records} == {rank}
        assert records[0]["step"] == 1
    # one run id for the job; with the budget schedule the ranks agree on when to probe
    assert {r["run_id"] for rs in by_rank.values() for r in rs} == {by_rank[0][0]["run_id"]}
    # rank 1's probes cost ~10x rank 0's (see tests/lightning_runs.py): alone, their budget
    # schedules pick different steps; agreed, they probe together
    assert [r["step"] for r in by_rank[0]] == [r["step"] for r in by_rank[1]]
    assert {r["n"] for r in by_rank[0]} == {16} and {r["n"] for r in by_rank[1]} == {128}


def test_monitor_error_warns_once_and_training_completes() -> None:
    callback = InversionLightningCallback(every_n_steps=1, layers=[9])  # the model has 2 layers
    run = trainer(None, callbacks=[callback], max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(TinyCausalLM(), train_loader(4))
    messages = _monitor_warnings(caught, "inversion-monitor failed")
    assert len(messages) == 1 and "layer 9 is out of range" in messages[0]
    assert run.global_step == 4
    assert "inversion/spearman" not in run.callback_metrics


def test_no_causal_lm_warns_once_and_training_completes() -> None:
    callback = InversionLightningCallback(every_n_steps=1, model_attr="policy")
    run = trainer(None, callbacks=[callback], max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(TinyCausalLM(), train_loader(2))
    messages = _monitor_warnings(caught, "inversion-monitor is off")
    assert len(messages) == 1 and "model_attr='policy'" in messages[0]
    assert run.global_step == 2 and callback.monitor is None


def test_resume_from_checkpoint_keeps_run_id_and_never_stores_the_token(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    options: dict[str, Any] = {
        "every_n_steps": 2,
        "tokens_per_probe": 16,
        "jsonl_path": str(path),
        "token": "secret-token-123",
    }
    first = InversionLightningCallback(**options)
    pl.seed_everything(0, verbose=False)
    run = trainer(None, callbacks=[first], max_steps=4)
    run.fit(TinyCausalLM(), train_loader(4))  # one whole epoch: a clean resume point
    checkpoint = tmp_path / "last.ckpt"
    run.save_checkpoint(checkpoint)
    assert b"secret-token-123" not in checkpoint.read_bytes()
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][first.state_key]
    assert saved["monitor"]["probes"] == 2 and "token" not in json.dumps(saved)

    second = InversionLightningCallback(**options)
    resumed = trainer(None, callbacks=[second], max_steps=8)
    resumed.fit(TinyCausalLM(), train_loader(4), ckpt_path=str(checkpoint))

    assert [r["step"] for r in _records(path)] == list(range(1, 9))
    records = _probed(path)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert {r["run_id"] for r in records} == {saved["monitor"]["run_id"]}
    state = second.state_dict()["monitor"]
    assert state["probes"] == 4 and state["sampler"]["calls"] == 4  # sampler stream went on


class _Norms(pl.Callback):  # type: ignore[misc]
    """The total grad norm before clipping, computed independently at each step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.values.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))  # fmt: skip


class _LogsKl(TinyCausalLM):
    """A module that logs a health field itself (as an RL module logs its KL)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/kl", 0.01 * (self.global_step + 1))
        return loss


def test_one_health_record_per_step_with_the_clipped_norm_and_logged_fields(
    tmp_path: Path,
) -> None:
    path = tmp_path / "records.jsonl"
    callback = InversionLightningCallback(every_n_steps=1000, jsonl_path=str(path))
    norms, losses = _Norms(), _Losses()
    pl.seed_everything(0, verbose=False)
    run = trainer(None, callbacks=[losses, norms, callback], max_steps=5, gradient_clip_val=0.05)
    run.fit(_LogsKl(), train_loader(5))
    records = _records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and not any(r["probed"] for r in records)
    assert [r["loss"] for r in records] == pytest.approx(losses.values, rel=1e-6)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms.values, rel=1e-5)
    assert all(r["grad_norm"] > 0.05 for r in records)  # before clipping
    assert all(r["learning_rate"] == pytest.approx(2e-3) for r in records)
    assert [r["kl"] for r in records] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    # the precision plugin has its own method back
    assert "clip_grad_by_norm" not in vars(run.precision_plugin)


def test_state_key_separates_destinations() -> None:
    a = InversionLightningCallback(jsonl_path="a.jsonl")
    b = InversionLightningCallback(jsonl_path="b.jsonl")
    assert a.state_key != b.state_key
    assert a.state_key == InversionLightningCallback(jsonl_path="a.jsonl", seed=3).state_key


def test_constructor_validates_overrides() -> None:
    with pytest.raises(
        ValueError, match="every_n_steps: Input should be greater than or equal to 1"
    ):
        InversionLightningCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="unknown_field: Extra inputs are not permitted"):
        InversionLightningCallback(unknown_field=1)
    with pytest.raises(ValueError, match="model_attr: expected a dotted attribute path"):
        InversionLightningCallback(model_attr="policy..model")


def test_callbacks_package_exports_are_lazy_and_sorted() -> None:
    from inversion_monitor import callbacks

    assert callbacks.__all__ == sorted(callbacks._LAZY_EXPORTS)
    for name in callbacks.__all__:
        assert getattr(callbacks, name).__name__ == name


def _run_python(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_hf_callback_import_does_not_import_lightning() -> None:
    _run_python(
        "import sys\n"
        "from inversion_monitor.callbacks import InversionTrainerCallback\n"
        "assert 'transformers' in sys.modules\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "assert not roots & {'lightning', 'pytorch_lightning'}, roots\n"
    )


def test_lightning_callback_import_does_not_import_transformers() -> None:
    # Lightning itself may pull transformers in (torchmetrics does when it is installed),
    # so record every import statement that names it and check none is ours.
    _run_python(
        "import builtins, sys\n"
        "seen = []\n"
        "original = builtins.__import__\n"
        "def spy(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    importer = (globals or {}).get('__name__', '')\n"
        "    seen.append((importer, name))\n"
        "    return original(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = spy\n"
        "from inversion_monitor.callbacks import InversionLightningCallback\n"
        "builtins.__import__ = original\n"
        "ours = [(i, n) for i, n in seen if i.startswith('inversion_monitor')]\n"
        "assert ('inversion_monitor.callbacks.lightning', 'lightning.pytorch') in ours, ours\n"
        "bad = [(i, n) for i, n in ours if n.split('.')[0] == 'transformers']\n"
        "assert not bad, bad\n"
        "assert 'inversion_monitor.callbacks.hf' not in sys.modules\n"
    )
