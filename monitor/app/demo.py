"""``inversion-monitor demo``: the whole story on a laptop, from one command.

It starts an embedded server (temporary SQLite database, free loopback
ports) whose Alertmanager sink posts to a tiny webhook receiver the demo also
starts (:mod:`.webhook`), then trains a tiny Llama-style model on the toy
arithmetic task in three phases, each its own run on the server:

1. **SFT** (kind ``sft``): the Hugging Face ``Trainer`` (or Lightning) with the
   monitor's callback, on one-operation arithmetic problems ("Q: 7*5=?") with
   their worked line and answer (:func:`~inversion_monitor.toy.corpus.fact_problems`):
   the tiny model learns to copy the operands and a fifth to a third of the facts;
2. **RL** (kind ``rl``): a GRPO-style loop (:mod:`.demo_rl`) from the SFT
   weights on a fixed pool of :data:`RL_POOL` such problems, rewarded mostly for
   the right answer (:func:`~.demo_rl.answer_reward`), watched through the
   custom-loop API with its RL signals (reward, policy entropy, Cui et al.'s
   covariance): the reward rises;
3. **destabilised RL**: the same loop from the same weights and seed, but from
   the step after the server's entropy warm-up the learning rate is
   :data:`LR_FACTOR` times too high. Whatever alert the server raises reaches
   the webhook, and the demo prints it, with its step, when it arrives.

Progress is one updating line per phase on a terminal (plain periodic lines
otherwise), with the URL of the server's live page. At the end it prints
each run's summary read back from the server (``GetRun``) and writes one
self-contained HTML report of the three phases. Nothing is tuned to look like
any paper: the numbers are what the toy model does.

>>> DemoOptions(steps=30).probe_every
1
>>> DemoOptions().probe_every
13
>>> DemoOptions(steps=30).rl_steps, DemoOptions(steps=30).unstable_steps
(30, 50)
"""

from __future__ import annotations

import copy
import math
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from inversion_monitor.app.demo_rl import GRPOSettings
    from inversion_monitor.app.webhook import AlertReceiver
    from inversion_monitor.engine.training_monitor import InversionMonitor
    from inversion_monitor.proto.v1 import monitor_pb2
    from inversion_monitor.toy.corpus import Task

RUN_NAME = "demo"
BATCH_SIZE = 16
TASK: Task = "facts"
"""The toy task of every phase (:func:`~inversion_monitor.toy.corpus.fact_problems`)."""
RL_LR = 1e-4
"""The healthy RL phase's learning rate: the reward rises steadily and the policy's entropy
falls by about a fifth (at 3e-4 the reward rose as much but the entropy fell in jumps the
server's EntropyCollapse rightly flagged; at 1e-3 the noisy updates of 4 problems a step
unlearnt the facts)."""
RL_POOL = 32
"""Problems in the RL phases' fixed pool: each is seen about 10 times in 80 steps of 4, so
the policy can learn the facts it got wrong (from a pool of 512 the reward barely moved)."""
RL_MAX_NEW_TOKENS = 24
"""Sampled tokens per completion ("12*9=108.\nA: 108\n" is 18 characters)."""
LR_FACTOR = 1000.0
"""How much too high the destabilised run's learning rate is (1e-4 -> 0.1)."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``inversion-monitor demo`` does (the command's flags).

    ``steps`` is the SFT phase's length; the RL phases scale with it.

    >>> DemoOptions(framework="lightning").framework
    'lightning'
    """

    steps: int = 400
    framework: Literal["transformers", "lightning"] = "transformers"
    keep_serving: bool = False
    out: Path = field(default_factory=lambda: Path("inversion-monitor-demo"))
    seed: int = 0

    @property
    def probe_every(self) -> int:
        """Probe the SFT run about 30 times (every step for short runs)."""
        return max(1, self.steps // 30)

    @property
    def rl_steps(self) -> int:
        """Steps of the healthy RL phase."""
        return max(30, self.steps // 5)

    @property
    def unstable_steps(self) -> int:
        """Steps of the destabilised run (long enough for the server's detectors)."""
        return max(50, self.steps // 8)


def _monitor_settings(
    options: DemoOptions, endpoint: str, run_id: str, *, name: str, kind: str, every: int
) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "run_id": run_id,
        "run_name": name,
        "project": "demo",
        "every_n_steps": every,
        "tokens_per_probe": 256,
        "sequences_per_probe": 8,
        "token_samples": 256,
        # the last block's Q and O: the probe's exact one-backward fast path
        "projections": ["q", "o"],
        "seed": options.seed,
        # sft: entropy falls because the model learns, and the server judges it as SFT
        "kind": kind,
    }


@dataclass(frozen=True)
class Fault:
    """A fault the demo injected on purpose: the run it is in and its first step."""

    run: str
    step: int
    what: str = "the learning-rate jump"


def steps_after(n: int) -> str:
    """``"1 step after"``, ``"2 steps after"``.

    >>> steps_after(1), steps_after(3)
    ('1 step after', '3 steps after')
    """
    return f"{n} step after" if n == 1 else f"{n} steps after"


def alert_line(alert: Any, fault: Fault | None = None) -> str:
    """An alert's line; on the run of ``fault``, with how many steps after the fault it came.

    >>> from inversion_monitor.app.webhook import ReceivedAlert
    >>> a = ReceivedAlert("RewardCollapse", "warning", "demo-rl-lr-x1000", 23, "s", "d", 1.0)
    >>> alert_line(a, Fault("demo-rl-lr-x1000", 21)).split(": d  ")[1]
    '[2 steps after the learning-rate jump at step 21]'
    """
    line: str = alert.line()
    if fault is not None and alert.run == fault.run and alert.step is not None:
        line += f"  [{steps_after(alert.step - fault.step)} {fault.what} at step {fault.step}]"
    return line


class _LiveLine:
    """One phase's progress with the latest rho (CI) / entropy (see :mod:`.progress`).

    Alerts the webhook received since the last update are printed on lines of
    their own as they arrive (with how many steps after ``fault``, on its run).
    """

    def __init__(
        self,
        steps: int,
        label: str,
        receiver: AlertReceiver | None = None,
        fault: Fault | None = None,
    ) -> None:
        from inversion_monitor.app.progress import ProgressLine

        self.progress = ProgressLine(steps, label=label)
        self.receiver = receiver
        self.fault = fault
        self._seen = 0
        self._probe = ""

    def update(self, step: int, monitor: InversionMonitor | None, extra: str = "") -> None:
        self.print_alerts()
        if monitor is not None and monitor.last_stats is not None and monitor.probes != self._seen:
            self._seen = monitor.probes
            stats = monitor.last_stats
            low, high = stats.ci
            if math.isfinite(stats.rho):
                text = f"rho {stats.rho:+.3f} [{low:+.2f}, {high:+.2f}]"
            else:
                text = "rho n/a"
            self._probe = f"{text}  entropy {stats.entropy_mean:.3f}  (probe at step {step})"
        detail = "  ".join(t for t in (self._probe, extra) if t)
        self.progress.update(step, detail or None)

    def print_alerts(self) -> None:
        if self.receiver is None:
            return
        for alert in self.receiver.take():
            self.progress.message(f"ALERT received by the webhook: {alert_line(alert, self.fault)}")

    def close(self) -> None:
        self.progress.close()


def train_transformers(
    options: DemoOptions, settings: dict[str, Any], workdir: Path, live: _LiveLine
) -> nn.Module:
    """Train with the HF ``Trainer`` and :class:`InversionTrainerCallback`; returns the model."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from inversion_monitor.callbacks import InversionTrainerCallback
    from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
    from inversion_monitor.toy.models import tiny_causal_lm
    from inversion_monitor.toy.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", seed=options.seed).train()
    inversion = InversionTrainerCallback(**settings)

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
            tokenizer, BATCH_SIZE * options.steps, seed=options.seed, max_length=96, task=TASK
        ),
        data_collator=causal_lm_collator(tokenizer),
        callbacks=[inversion, Progress()],
    )
    trainer.remove_callback(PrinterCallback)  # the live line replaces its printed dicts
    try:
        trainer.train()
    finally:
        live.close()
    trained: nn.Module = trainer.model
    return trained


def train_lightning(
    options: DemoOptions, settings: dict[str, Any], workdir: Path, live: _LiveLine
) -> nn.Module:
    """Train with Lightning and :class:`InversionLightningCallback`; returns the model."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from inversion_monitor.callbacks import InversionLightningCallback
    from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
    from inversion_monitor.toy.models import tiny_causal_lm
    from inversion_monitor.toy.tokenizer import char_tokenizer

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
    rows = tokenized_corpus(
        tokenizer, BATCH_SIZE * options.steps, seed=options.seed, max_length=96, task=TASK
    )
    loader: DataLoader[Any] = DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=BATCH_SIZE,
        shuffle=False,
        collate_fn=lambda items: dict(collate(items)),
    )
    inversion = InversionLightningCallback(**settings)

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
    module = TinyLM()
    try:
        trainer.fit(module, loader)
    finally:
        live.close()
    model: nn.Module = module.model
    return model


@dataclass(frozen=True)
class Phase:
    """One run of the demo: its title, what was done, and its run id on the server."""

    title: str
    what: str
    run_id: str
    lr_jump_step: int | None = None


def _alerts_warmup() -> int:
    """Records the server's EntropyCollapse detector uses to learn a run's early level."""
    from inversion_monitor.server.detectors import AlertsConfig

    return AlertsConfig().entropy.warmup


def _rl_phase(
    model: nn.Module,
    tokenizer: Any,
    settings: dict[str, Any],
    grpo: GRPOSettings,
    live: _LiveLine,
) -> InversionMonitor:
    from inversion_monitor.app.demo_rl import train_grpo
    from inversion_monitor.config import MonitorConfig
    from inversion_monitor.engine.training_monitor import InversionMonitor

    monitor = InversionMonitor(MonitorConfig(**settings), framework="custom")

    def on_step(step: int, values: dict[str, float]) -> None:
        live.update(
            step,
            monitor,
            f"reward {values['reward']:.3f}  policy entropy {values['entropy']:.3f}  "
            f"lr {values['lr']:.0e}",
        )

    try:
        train_grpo(model, tokenizer, monitor, grpo, on_step=on_step)
    finally:
        live.close()
        monitor.close()
    return monitor


def rl_settings(steps: int, seed: int, *, lr_jump: tuple[int, float] | None = None) -> GRPOSettings:
    """The RL phases' GRPO loop: the SFT task's problems, a fixed pool, the answer reward.

    >>> rl_settings(80, 0).pool_size, rl_settings(80, 0, lr_jump=(21, 10.0)).learning_rate(21)
    (32, 0.001)
    """
    from inversion_monitor.app.demo_rl import GRPOSettings

    return GRPOSettings(
        steps=steps,
        lr=RL_LR,
        seed=seed,
        task=TASK,
        pool_size=RL_POOL,
        reward_kind="answer",
        max_new_tokens=RL_MAX_NEW_TOKENS,
        lr_jump=lr_jump,
    )


def run_phases(
    options: DemoOptions,
    endpoint: str,
    workdir: Path,
    receiver: AlertReceiver,
    say: Callable[[str], None] = print,
) -> list[Phase]:
    """Train the three phases against the server at ``endpoint``; returns them in order."""

    from inversion_monitor.toy.tokenizer import char_tokenizer

    phases = []
    # --- 1. SFT
    sft = Phase(
        "SFT",
        f"{options.steps} steps of supervised training on one-operation arithmetic problems "
        f"with their worked line ({options.framework}, "
        f"lr 3e-3, batch {BATCH_SIZE}), probed every {options.probe_every} steps",
        uuid.uuid4().hex,
    )
    say(f"phase 1/3 {sft.title}: {sft.what}")
    train = train_lightning if options.framework == "lightning" else train_transformers
    settings = _monitor_settings(
        options,
        endpoint,
        sft.run_id,
        name=f"{RUN_NAME}-sft",
        kind="sft",
        every=options.probe_every,
    )
    model = train(options, settings, workdir, _LiveLine(options.steps, "sft", receiver))
    phases.append(sft)
    sft_weights = copy.deepcopy(model.state_dict())
    tokenizer = char_tokenizer()

    # --- 2. RL
    grpo = rl_settings(options.rl_steps, options.seed)
    rl = Phase(
        "RL",
        f"{grpo.steps} steps of a GRPO-style loop from the SFT weights ({grpo.prompts} problems "
        f"of a fixed pool of {grpo.pool_size} x {grpo.group} samples per step, lr {grpo.lr:g}; "
        "reward: 1 for the right answer, else a tenth of the working's similarity to the "
        "worked solution), probed every step",
        uuid.uuid4().hex,
    )
    say(f"phase 2/3 {rl.title}: {rl.what}")
    settings = _monitor_settings(
        options, endpoint, rl.run_id, name=f"{RUN_NAME}-rl", kind="rl", every=1
    )
    _rl_phase(model, tokenizer, settings, grpo, _LiveLine(grpo.steps, "rl", receiver))
    phases.append(rl)

    # --- 3. the same RL run with a learning rate far too high
    jump = _alerts_warmup() + 1
    bad = rl_settings(options.unstable_steps, options.seed, lr_jump=(jump, LR_FACTOR))
    unstable = Phase(
        "destabilised RL",
        f"the RL loop again from the SFT weights with the same seed, but from step {jump} "
        f"(after the server's {jump - 1}-record entropy warm-up) the learning rate is "
        f"{LR_FACTOR:g}x too high ({bad.lr:g} -> {bad.learning_rate(jump):g}); "
        f"{bad.steps} steps",
        uuid.uuid4().hex,
        lr_jump_step=jump,
    )
    say(f"phase 3/3 {unstable.title}: {unstable.what}")
    model.load_state_dict(sft_weights)
    settings = _monitor_settings(
        options,
        endpoint,
        unstable.run_id,
        name=f"{RUN_NAME}-rl-lr-x{LR_FACTOR:g}",
        kind="rl",
        every=1,
    )
    fault = Fault(f"{RUN_NAME}-rl-lr-x{LR_FACTOR:g}", jump)
    live = _LiveLine(bad.steps, "destabilised rl", receiver, fault)
    _rl_phase(model, tokenizer, settings, bad, live)
    phases.append(unstable)
    return phases


def reward_rise(response: monitor_pb2.GetRunResponse) -> str | None:
    """How an RL run's reward moved: the stored rewards' means over its first and last fifth.

    >>> from inversion_monitor.proto.v1 import monitor_pb2
    >>> rewards = [0.2, 0.3, 0.5, 0.6, 0.6]
    >>> run = monitor_pb2.GetRunResponse(history=[
    ...     monitor_pb2.StepRecord(step=s, reward_mean=r) for s, r in enumerate(rewards, 1)])
    >>> reward_rise(run)
    'mean reward rose from 0.200 (step 1) to 0.600 (step 5), +0.400'
    """
    from inversion_monitor.app.report import rl_trajectory

    points = [p for p in rl_trajectory(response.history) if math.isfinite(p.reward_mean)]
    if not points:
        return None
    k = max(1, len(points) // 5)
    head, tail = points[:k], points[-k:]
    first = sum(p.reward_mean for p in head) / k
    last = sum(p.reward_mean for p in tail) / k

    def span(part: list[Any]) -> str:
        a, b = part[0].step, part[-1].step
        return f"step {a}" if a == b else f"steps {a}-{b}"

    verb = "rose" if last > first else "did not rise"
    return (
        f"mean reward {verb} from {first:.3f} ({span(head)}) to "
        f"{last:.3f} ({span(tail)}), {last - first:+.3f}"
    )


def fetch_run(
    target: str, run: str, *, limit: int, timeout: float = 10.0
) -> monitor_pb2.GetRunResponse:
    """``GetRun`` of ``run`` from the server at ``target``."""
    from inversion_monitor.telemetry.reader import RunReader
    from inversion_monitor.telemetry.transport import Transport

    with RunReader(Transport.create(target), timeout_s=timeout) as reader:
        return reader.get_run(run, history_limit=limit)


def _history_limit(options: DemoOptions) -> int:
    return max(options.steps, options.rl_steps, options.unstable_steps) + 10


def _wait_for_interrupt(message: str) -> None:
    """Print ``message``, then wait for Ctrl-C or, on the main thread (the CLI), SIGTERM.

    The handler is in place before ``message`` appears; the caller stops the server.
    """
    stop = threading.Event()
    previous: Any = None
    # a handler can only be installed from the main thread; an embedding caller keeps its own
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        print(message, flush=True)
        while not stop.wait(1.0):
            pass
        print("\nSIGTERM: stopping the server", flush=True)
    except KeyboardInterrupt:
        print("\nstopping the server", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _await_alert(receiver: AlertReceiver, fault: Fault, timeout_s: float) -> None:
    """Print the alerts still arriving; wait (bounded) for one on the destabilised run."""
    receiver.wait(lambda got: any(a.run == fault.run for a in got), timeout_s)
    for alert in receiver.take():
        print(f"ALERT received by the webhook: {alert_line(alert, fault)}", flush=True)


def run_demo(options: DemoOptions) -> int:
    """Run the demo; returns the process exit code."""
    import logging
    import warnings

    import torch

    from inversion_monitor.app.report import format_phase_summary, write_demo_report
    from inversion_monitor.app.webhook import PATH as WEBHOOK_PATH
    from inversion_monitor.app.webhook import AlertReceiver
    from inversion_monitor.server import MonitorServer, ServerConfig

    if options.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {options.steps}")
    started = time.monotonic()
    logging.getLogger("inversion_monitor").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    # the toy model's matrices are far too small to gain from threads; extra
    # threads only spin against each other (10x slower on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    receiver = AlertReceiver().start()
    try:
        with tempfile.TemporaryDirectory(prefix="inversion-monitor-demo-") as tmp:
            workdir = Path(tmp)
            server = MonitorServer(
                ServerConfig(
                    grpc_address="127.0.0.1:0",
                    http_address="127.0.0.1:0",
                    db=workdir / "monitor.db",
                    alertmanager_url=receiver.url,
                )
            ).start()
            try:
                metrics_url = f"{server.http_url}/metrics"
                database = workdir / "monitor.db"
                print(
                    f"server: gRPC {server.grpc_target}, metrics {metrics_url}, database {database}"
                )
                print(f"live page: {server.page_url}  (open it in a browser to watch the runs)")
                print(
                    f"alert webhook: {receiver.url}{WEBHOOK_PATH} (the server's Alertmanager "
                    "sink posts here; alerts are printed as they arrive)",
                    flush=True,
                )
                phases = run_phases(options, server.grpc_target, workdir, receiver)
                unstable_name = f"{RUN_NAME}-rl-lr-x{LR_FACTOR:g}"
                jump = phases[-1].lr_jump_step
                fault = Fault(unstable_name, jump if jump is not None else 0)
                _await_alert(receiver, fault, timeout_s=15.0)
                responses = [
                    fetch_run(server.grpc_target, p.run_id, limit=_history_limit(options))
                    for p in phases
                ]
                print()
                for phase, response in zip(phases, responses, strict=True):
                    print(format_phase_summary(phase.title, response))
                    print()
                rise = reward_rise(responses[1])
                if rise is not None:
                    print(f"healthy RL ({RUN_NAME}-rl): {rise}")
                got = [a for a in receiver.received if a.run == unstable_name]
                print(
                    f"webhook: {len(receiver.received)} alert(s) received"
                    + (
                        ""
                        if got
                        else f"; none for {unstable_name} (the destabilised run raised no alert)"
                    )
                )
                for alert in receiver.received:
                    print(f"  {alert_line(alert, fault)}")
                stepped = [a for a in got if a.step is not None]
                if stepped:
                    first = min(stepped, key=lambda a: (a.step, a.received_at))
                    print(
                        f"first alert on {unstable_name}: {first.name} at step {first.step}, "
                        f"{steps_after((first.step or 0) - fault.step)} the learning-rate jump "
                        f"at step {fault.step}"
                    )
                print(f"metrics were served at {metrics_url}")
                report = write_demo_report(
                    [
                        (p.title, p.what, p.lr_jump_step, r)
                        for p, r in zip(phases, responses, strict=True)
                    ],
                    options.out / "report.html",
                    received=[a.line() for a in receiver.received],
                    notes=[
                        f"seed {options.seed}; SFT with {options.framework}; "
                        f"{time.monotonic() - started:.0f} s in all",
                        *([f"healthy RL: {rise}"] if rise is not None else []),
                    ],
                )
                print(f"report: {report.resolve()}")
                print(f"demo took {time.monotonic() - started:.0f} s", flush=True)
                if options.keep_serving:
                    _wait_for_interrupt(
                        f"the server stays up: live page {server.page_url}, metrics {metrics_url}  "
                        "(Ctrl-C or SIGTERM to stop)"
                    )
            finally:
                server.stop()
    finally:
        receiver.stop()
        torch.set_num_threads(threads)
    return 0
