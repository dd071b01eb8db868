"""``inversion-monitor demo``: the whole system on a laptop, from one command.

It starts an embedded server (temporary SQLite database, free loopback
ports), trains a tiny Llama-style model on the synthetic reasoning corpus with
the Hugging Face ``Trainer`` (or Lightning) and the monitor's callback, shows
its progress with the latest rho / entropy (one updating line on a
terminal, a plain line every tenth of the run otherwise) and the URL of the
server's live page, then prints a summary read back
from the server (``GetRun``) and writes a self-contained HTML report.

>>> DemoOptions(steps=30).probe_every
1
>>> DemoOptions().probe_every
8
"""

from __future__ import annotations

import math
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.engine.training_monitor import InversionMonitor
    from inversion_monitor.proto.v1 import monitor_pb2

RUN_NAME = "demo"
BATCH_SIZE = 16


@dataclass(frozen=True)
class DemoOptions:
    """What ``inversion-monitor demo`` does (the command's flags).

    >>> DemoOptions(framework="lightning").framework
    'lightning'
    """

    steps: int = 250
    framework: Literal["transformers", "lightning"] = "transformers"
    keep_serving: bool = False
    out: Path = field(default_factory=lambda: Path("inversion-monitor-demo"))
    seed: int = 0

    @property
    def probe_every(self) -> int:
        """Probe about 30 times over the run (every step for short runs)."""
        return max(1, self.steps // 30)


def _monitor_settings(options: DemoOptions, endpoint: str, run_id: str) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "run_id": run_id,
        "run_name": RUN_NAME,
        "project": "demo",
        "every_n_steps": options.probe_every,
        "tokens_per_probe": 256,
        "sequences_per_probe": 8,
        "token_samples": 256,
        # the last block's Q and O: the probe's exact one-backward fast path
        "projections": ["q", "o"],
        "seed": options.seed,
        # supervised training on a corpus (with either framework): entropy falls because
        # the model learns, and the server judges it as SFT
        "kind": "sft",
    }


class _LiveLine:
    """The training progress with the latest step / rho (CI) / entropy (see :mod:`.progress`)."""

    def __init__(self, steps: int) -> None:
        from inversion_monitor.app.progress import ProgressLine

        self.progress = ProgressLine(steps, label="training")
        self._seen = 0

    def update(self, step: int, monitor: InversionMonitor | None) -> None:
        if monitor is None or monitor.last_stats is None or monitor.probes == self._seen:
            self.progress.update(step)
            return
        self._seen = monitor.probes
        stats = monitor.last_stats
        low, high = stats.ci
        if math.isfinite(stats.rho):
            text = f"rho {stats.rho:+.3f} [{low:+.2f}, {high:+.2f}]"
        else:
            text = "rho n/a"
        self.progress.update(
            step, f"{text}  entropy {stats.entropy_mean:.3f}  (probe at step {step})"
        )

    def close(self) -> None:
        self.progress.close()


def train_transformers(options: DemoOptions, settings: dict[str, Any], workdir: Path) -> None:
    """Train with the HF ``Trainer`` and :class:`InversionTrainerCallback`."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from inversion_monitor.app.toy.data import causal_lm_collator, tokenized_corpus
    from inversion_monitor.app.toy.models import tiny_causal_lm
    from inversion_monitor.app.toy.tokenizer import char_tokenizer
    from inversion_monitor.callbacks import InversionTrainerCallback

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", seed=options.seed).train()
    inversion = InversionTrainerCallback(**settings)
    live = _LiveLine(options.steps)

    class Progress(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            live.update(int(state.global_step), inversion.monitor)

    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        max_steps=options.steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=3e-3,
        warmup_steps=min(20, options.steps // 10),
        logging_steps=max(10, options.probe_every),
        report_to=[],
        save_strategy="no",
        seed=options.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized_corpus(
            tokenizer, BATCH_SIZE * options.steps, seed=options.seed, max_length=96
        ),
        data_collator=causal_lm_collator(tokenizer),
        callbacks=[inversion, Progress()],
    )
    trainer.remove_callback(PrinterCallback)  # the live line replaces its printed dicts
    try:
        trainer.train()
    finally:
        live.close()


def train_lightning(options: DemoOptions, settings: dict[str, Any], workdir: Path) -> None:
    """Train with Lightning and :class:`InversionLightningCallback`."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from inversion_monitor.app.toy.data import causal_lm_collator, tokenized_corpus
    from inversion_monitor.app.toy.models import tiny_causal_lm
    from inversion_monitor.app.toy.tokenizer import char_tokenizer
    from inversion_monitor.callbacks import InversionLightningCallback

    class TinyLM(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_causal_lm("llama", seed=options.seed).train()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    tokenizer = char_tokenizer()
    collate = causal_lm_collator(tokenizer)
    rows = tokenized_corpus(tokenizer, BATCH_SIZE * options.steps, seed=options.seed, max_length=96)
    loader: DataLoader[Any] = DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=BATCH_SIZE,
        shuffle=False,
        collate_fn=lambda items: dict(collate(items)),
    )
    inversion = InversionLightningCallback(**settings)
    live = _LiveLine(options.steps)

    class Progress(pl.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            live.update(int(trainer.global_step), inversion.monitor)

    pl.seed_everything(options.seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=options.steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[inversion, Progress()],
        default_root_dir=str(workdir),
    )
    try:
        trainer.fit(TinyLM(), loader)
    finally:
        live.close()


def fetch_run(
    target: str, run: str, *, limit: int, timeout: float = 10.0
) -> monitor_pb2.GetRunResponse:
    """``GetRun`` of ``run`` from the server at ``target``."""
    from inversion_monitor.telemetry.reader import RunReader
    from inversion_monitor.telemetry.transport import Transport

    with RunReader(Transport.create(target), timeout_s=timeout) as reader:
        return reader.get_run(run, history_limit=limit)


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        print("\nstopping the server")


def run_demo(options: DemoOptions) -> int:
    """Run the demo; returns the process exit code."""
    import logging
    import warnings

    from inversion_monitor.app.report import format_summary, write_run_report
    from inversion_monitor.server import MonitorServer, ServerConfig

    if options.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {options.steps}")
    logging.getLogger("inversion_monitor").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    with tempfile.TemporaryDirectory(prefix="inversion-monitor-demo-") as tmp:
        workdir = Path(tmp)
        server = MonitorServer(
            ServerConfig(
                grpc_address="127.0.0.1:0",
                http_address="127.0.0.1:0",
                db=workdir / "monitor.db",
            )
        ).start()
        try:
            metrics_url = f"{server.http_url}/metrics"
            database = workdir / "monitor.db"
            print(f"server: gRPC {server.grpc_target}, metrics {metrics_url}, database {database}")
            print(f"live page: {server.page_url}  (open it in a browser to watch the run)")
            print(
                f"training a tiny Llama for {options.steps} steps with {options.framework}, "
                f"probing every {options.probe_every} steps",
                flush=True,
            )
            train = train_lightning if options.framework == "lightning" else train_transformers
            run_id = uuid.uuid4().hex
            train(options, _monitor_settings(options, server.grpc_target, run_id), workdir)
            response = fetch_run(server.grpc_target, run_id, limit=options.steps + 10)
            print()
            print(format_summary(response))
            print(f"metrics were served at {metrics_url}")
            report = write_run_report(
                response,
                options.out / "report.html",
                notes=[f"{options.steps} steps with {options.framework}, seed {options.seed}"],
            )
            print(f"report: {report.resolve()}")
            if options.keep_serving:
                print(
                    f"the server stays up: live page {server.page_url}, metrics {metrics_url}  "
                    "(Ctrl-C to stop)",
                    flush=True,
                )
                _wait_for_interrupt()
        finally:
            server.stop()
    return 0
