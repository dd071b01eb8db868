"""Every way to name the server takes a list and fails over: the HF and Lightning
callbacks' ``endpoint=``, a custom loop's ``MonitorConfig`` and ``inversion-monitor run
--endpoint``. The first endpoint is down (nothing listens); a real server on loopback is
the second."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from inversion_monitor import TelemetryWarning
from inversion_monitor.app.cli import main
from inversion_monitor.callbacks import InversionLightningCallback, InversionTrainerCallback
from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.training_monitor import InversionMonitor
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import MonitorServer
from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.lightning_runs import TinyCausalLM, train_loader, trainer
from tests.server_support import free_port, open_run, running, stub_for
from tests.test_run_command import FIXTURES
from tests.test_run_command import run as run_command
from tests.trainers import hf_trainer

FAST = {"backoff_initial_s": 0.05, "flush_interval_s": 0.05}


def _endpoints(server: MonitorServer) -> str:
    return f"127.0.0.1:{free_port()},{server.grpc_target}"


def _steps(server: MonitorServer, run: str) -> list[int]:
    with stub_for(server) as stub:
        reply = stub.GetRun(monitor_pb2.GetRunRequest(run=run, history_limit=100), timeout=10)
    return [r.step for r in reply.history]


def test_hf_callback_with_the_first_endpoint_down(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        callback = InversionTrainerCallback(
            endpoint=_endpoints(server), run_name="hf-failover", every_n_steps=2, **FAST
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", TelemetryWarning)  # a failover is no outage
            hf_trainer(tmp_path, callbacks=[callback], max_steps=4).train()
        assert _steps(server, "hf-failover") == [1, 2, 3, 4]


def test_lightning_callback_with_the_first_endpoint_down(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        callback = InversionLightningCallback(
            endpoint=_endpoints(server), run_name="pl-failover", every_n_steps=2, **FAST
        )
        pl.seed_everything(0, verbose=False)
        trainer(None, callbacks=[callback], max_steps=4).fit(TinyCausalLM(), train_loader(4))
        assert _steps(server, "pl-failover") == [1, 2, 3, 4]


def test_custom_loop_with_the_first_endpoint_down(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    batch = causal_lm_collator(tokenizer)(tokenized_corpus(tokenizer, 4, seed=3, max_length=48))
    model = tiny_causal_lm("llama", seed=0).train()
    with running(tmp_path) as server:
        monitor = InversionMonitor(
            MonitorConfig(
                endpoint=_endpoints(server), run_name="loop-failover", every_n_steps=1, **FAST
            )
        )
        monitor.attach(model)
        for step in (1, 2, 3):
            loss = model(**batch).loss
            loss.backward()
            model.zero_grad()
            monitor.step_end(step, model, loss=float(loss.detach()))
        report = monitor.close(timeout_s=30)
        assert report is not None and (report.delivered, report.dropped) == (3, 0)
        assert _steps(server, "loop-failover") == [1, 2, 3]


@pytest.mark.slow
def test_run_command_passes_the_endpoint_list_to_the_script(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        endpoints = _endpoints(server)
        proc = run_command(
            [
                "--endpoint",
                endpoints,
                "--run-name",
                "run-failover",
                "--backoff-initial-s",
                "0.05",
                "--",
                sys.executable,
                str(FIXTURES / "plain_hf_train.py"),
                str(tmp_path / "out"),
                "3",
            ]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _steps(server, "run-failover") == [1, 2, 3]
    assert f"sending to {endpoints}" in proc.stderr


def test_run_command_refuses_a_bad_list_naming_the_option() -> None:
    proc = run_command(["--endpoint", "127.0.0.1:1,127.0.0.1:1", "--", sys.executable, "-V"])
    assert proc.returncode == 2
    assert "--endpoint: " in proc.stderr and "name each server once" in proc.stderr


@pytest.mark.parametrize("command", [["runs"], ["show", "read-failover"]])
def test_runs_and_show_read_from_the_first_replica_that_answers(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "read-failover", name="read-failover")
        endpoints = _endpoints(server)
        assert main([*command, "--endpoint", endpoints, "--timeout", "5"]) == 0
        assert "read-failover" in capsys.readouterr().out
        dead = endpoints.split(",")[0]
        assert main([*command, "--endpoint", f"{dead},{dead}"]) == 1
        assert "--endpoint " in capsys.readouterr().err  # the duplicate is named
