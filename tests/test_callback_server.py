"""The HF callback end to end: a real Trainer sending to a real server on loopback."""

from __future__ import annotations

import math
import time
import urllib.request
import warnings

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import TrainerCallback

from inversion_monitor.callbacks import InversionTrainerCallback
from inversion_monitor.proto.v1 import monitor_pb2
from tests.server_support import running, stub_for
from tests.trainers import hf_trainer


def history(server, run: str, limit: int = 1000):
    with stub_for(server) as stub:
        return stub.GetRun(monitor_pb2.GetRunRequest(run=run, history_limit=limit), timeout=10)


def test_every_probed_step_arrives_and_is_exported(tmp_path):
    with running(tmp_path) as server:
        callback = InversionTrainerCallback(
            endpoint=server.grpc_target,
            run_name="hf e2e",
            project="tests",
            every_n_steps=3,
            layers=[0, -1],
            token_samples=8,
        )
        trainer = hf_trainer(tmp_path, callbacks=[callback], max_steps=12)
        trainer.train()  # on_train_end closes the client: everything is flushed
        run_id = callback.resume_state["run_id"]
        reply = history(server, run_id)
        assert [r.step for r in reply.history] == list(range(1, 13))  # one record a step
        assert [r.sequence for r in reply.history] == list(range(1, 13))
        assert all(r.HasField("loss") and r.HasField("grad_norm") for r in reply.history)
        probed = [r for r in reply.history if r.HasField("inversion")]
        assert [r.step for r in probed] == [3, 6, 9, 12]
        logged = {e["step"]: e for e in trainer.state.log_history if "inversion/spearman" in e}
        for record in probed:
            assert record.inversion.n == 64
            assert record.inversion.spearman.value == pytest.approx(
                logged[record.step]["inversion/spearman"]
            )
            assert {(c.layer, c.projection) for c in record.components} == {
                (layer, p) for layer in (0, 1) for p in "qkvo"
            }
            assert len(record.samples) == 8
        assert reply.summary.run.framework == "transformers"
        assert reply.summary.run.model_type == "llama"
        assert reply.summary.status == "completed"
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        (sample,) = families["inversion_monitor_step"].samples
        assert sample.value == 12 and sample.labels["run"] == reply.summary.display_name


class _PoisonWeights(TrainerCallback):  # type: ignore[misc]
    """A fault: after optimizer step ``at`` one weight becomes NaN, so every later step's
    loss and grad norm are NaN (what a NaN batch or an overflow does to a run)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan


def test_a_nan_loss_arrives_as_nan_named_in_nonfinite_fields(tmp_path):
    with running(tmp_path) as server:
        callback = InversionTrainerCallback(
            endpoint=server.grpc_target, run_name="diverges", every_n_steps=1000
        )
        trainer = hf_trainer(
            tmp_path, callbacks=[_PoisonWeights(3), callback], max_steps=5, logging_steps=1
        )
        trainer.train()
        reply = history(server, callback.resume_state["run_id"])
        by_step = {r.step: r for r in reply.history}
        assert sorted(by_step) == [1, 2, 3, 4, 5]
        for step in (1, 2, 3):
            assert math.isfinite(by_step[step].loss) and not by_step[step].nonfinite_fields
        for step in (4, 5):
            record = by_step[step]
            assert math.isnan(record.loss) and math.isnan(record.grad_norm)
            assert list(record.nonfinite_fields) == ["loss", "grad_norm"]
        # the trainer's own log hides the NaN loss (logging_nan_inf_filter); the record does not
        logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        assert math.isfinite(logged[4])
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        name = reply.summary.display_name
        assert f'inversion_monitor_loss{{run="{name}"}} NaN' in text
        assert f'inversion_monitor_nonfinite_health_values{{run="{name}"}} 2.0' in text


def test_server_down_for_the_whole_run_training_finishes_with_one_warning(tmp_path):
    callback = InversionTrainerCallback(endpoint="127.0.0.1:1", every_n_steps=1)
    trainer = hf_trainer(tmp_path, callbacks=[callback], max_steps=6)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    elapsed = time.monotonic() - start
    assert trainer.state.global_step == 6
    telemetry = [w for w in caught if "127.0.0.1:1" in str(w.message)]
    assert len(telemetry) == 1, [str(w.message) for w in caught]
    logged = [e for e in trainer.state.log_history if "inversion/spearman" in e]
    assert len(logged) == 6  # local metrics still flow
    assert elapsed < 60
