"""The demo's RL phases: a small GRPO-style loop on the toy arithmetic task.

Each step takes ``prompts`` problems ("Q: (12+7)*3=?"), samples ``group``
completions per problem from the policy, scores each with a verifiable reward
(:func:`rollout_reward`), turns the rewards into GRPO group advantages
(:func:`~inversion_monitor.rl.corrpo.group_advantages`) and takes one on-policy
step of ``-mean(advantage * log p(token))`` over the completion tokens. The
monitor watches it through the custom-loop API
(:meth:`InversionMonitor.step_end` with the step's
:class:`~inversion_monitor.rl.signals.RLStats`: reward, the policy's entropy and
Cui et al.'s covariance, from the loss's own log-probs; run kind ``rl``).

Every step also yields the health values a trainer reports (no extra
training forward): the loss, the gradient norm (before clipping, when
``max_grad_norm`` clips), the completion length and the KL to the starting
policy (one no-grad forward of a frozen copy; the k3 estimator, as TRL's GRPO;
``kl_coef`` > 0 adds it to the loss); the monitor sends them with every step's
record (``step_end``'s ``grad_norm`` and ``health``), where the server's
GradNormSpike, KLSurge and LengthDrift detectors watch them.

The task (``task``), the size of the fixed problem pool (``pool_size``) and
the reward (``reward_kind``) are settings: the defaults (worked multi-step
chains, 512 problems, :func:`rollout_reward`) are what the failure corpus
records; the demo's healthy phase trains on one-operation ``"facts"``
(:func:`~inversion_monitor.toy.corpus.fact_problems`, which its SFT phase
partly teaches) from a pool of 32 with a reward that is mostly correctness
(:func:`answer_reward`), so the reward has something to learn from.

Faults, for the demo and the failure corpus (``benchmarks/bench_detection.py``):
``lr_jump`` ``(step, factor)``: from that step on the learning rate is
``factor`` times higher (a broken schedule); ``reward_fault`` ``(step,
"zero")``: the reward function returns 0 from that step, ``(step, "length")``:
it pays for length instead (reward hacking); ``collapse_at``: from that step
the KL term is off, samples are drawn at ``collapse_temperature`` and the
group baseline is lost (advantage = reward >= 0): the policy is trained on its
own sharpened samples and its entropy collapses. The policy entropy reported is
that of the distribution the step's tokens were sampled from (logits divided by
the sampling temperature, as TRL's ``GRPOTrainer`` logs it), so it falls on the
first collapsed step; ``on_step`` also gets ``entropy_unscaled`` (temperature 1).

>>> from inversion_monitor.toy.corpus import ArithmeticProblem
>>> p = ArithmeticProblem(prompt="Q: 2+3=?\\n", completion="2+3=5.\\nA: 5\\n", answer=5)
>>> rollout_reward("2+3=5.\\nA: 5\\n", p)
1.0
>>> rollout_reward("", p)
0.0
>>> answer_reward("2+3=5.\\nA: 5\\n", p), round(answer_reward("2+3=6.\\nA: 6\\n", p), 3)
(1.0, 0.083)
>>> cut_length("2+3=5.\\nA: 5\\nQ: 1+1", max_length=64)
12
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from inversion_monitor.toy.corpus import Task

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from inversion_monitor.engine.training_monitor import InversionMonitor
    from inversion_monitor.toy.corpus import ArithmeticProblem

PAD = 0
POOL_SIZE = 512


def rollout_reward(completion: str, problem: ArithmeticProblem) -> float:
    """Half for how close the working is to the worked solution, half for the right answer.

    The first half is ``difflib``'s similarity ratio of the completion to the
    reference working (dense, so a group of samples rarely ties); the second
    is 0.5 when the line ``A: <answer>`` is there.
    """
    similarity = difflib.SequenceMatcher(None, completion, problem.completion).ratio()
    correct = f"A: {problem.answer}\n" in completion
    return 0.5 * similarity + (0.5 if correct else 0.0)


def answer_reward(completion: str, problem: ArithmeticProblem) -> float:
    """1 when the line ``A: <answer>`` is there; else a tenth of the completion's similarity
    to the worked solution (``difflib``'s ratio).

    The small dense part keeps a gradient for a policy that has no answer right yet (a
    short SFT phase); once answers are right, the reward is mostly their share.
    """
    if f"A: {problem.answer}\n" in completion:
        return 1.0
    return 0.1 * difflib.SequenceMatcher(None, completion, problem.completion).ratio()


def cut_length(text: str, *, max_length: int) -> int:
    """Characters of a sampled text up to and including its answer line (all if none)."""
    at = text.find("A:")
    if at < 0:
        return min(len(text), max_length)
    end = text.find("\n", at)
    return min(max_length, len(text) if end < 0 else end + 1)


@dataclass(frozen=True)
class GRPOSettings:
    """The knobs of the demo's GRPO loop.

    >>> GRPOSettings(steps=10, lr=1e-3).learning_rate(5)
    0.001
    >>> GRPOSettings(steps=10, lr=1e-3, lr_jump=(5, 100.0)).learning_rate(5)
    0.1
    """

    steps: int
    lr: float = 3e-4
    prompts: int = 4
    group: int = 8
    max_new_tokens: int = 56
    temperature: float = 1.0
    seed: int = 0
    lr_jump: tuple[int, float] | None = None
    kl_coef: float = 0.0
    max_grad_norm: float = math.inf
    reward_fault: tuple[int, Literal["zero", "length"]] | None = None
    collapse_at: int | None = None
    collapse_temperature: float = 0.3
    collapse_lr_factor: float = 1.0
    task: Task = "chain"
    pool_size: int = POOL_SIZE
    reward_kind: Literal["working", "answer"] = "working"

    def learning_rate(self, step: int) -> float:
        """The learning rate of ``step`` (1-based)."""
        lr = self.lr
        if self.lr_jump is not None and step >= self.lr_jump[0]:
            lr *= self.lr_jump[1]
        if self.collapse_at is not None and step >= self.collapse_at:
            lr *= self.collapse_lr_factor
        return lr

    def sampling_temperature(self, step: int) -> float:
        """The temperature completions of ``step`` are drawn at.

        >>> GRPOSettings(steps=10, collapse_at=4).sampling_temperature(4)
        0.3
        """
        if self.collapse_at is not None and step >= self.collapse_at:
            return self.collapse_temperature
        return self.temperature

    def kl_weight(self, step: int) -> float:
        """The KL coefficient of ``step`` (0 once the collapse fault is on)."""
        if self.collapse_at is not None and step >= self.collapse_at:
            return 0.0
        return self.kl_coef

    def reward(self, step: int, completion: str, problem: ArithmeticProblem) -> float:
        """The reward of one completion at ``step`` (the faulty one once ``reward_fault`` is on).

        >>> from inversion_monitor.toy.corpus import ArithmeticProblem
        >>> p = ArithmeticProblem(prompt="Q: 2+3=?\\n", completion="2+3=5.\\nA: 5\\n", answer=5)
        >>> s = GRPOSettings(steps=10, reward_fault=(5, "length"), max_new_tokens=40)
        >>> s.reward(4, "2+3=5.\\nA: 5\\n", p), s.reward(5, "x" * 20, p)
        (1.0, 0.5)
        """
        fault = self.reward_fault
        if fault is not None and step >= fault[0]:
            if fault[1] == "zero":
                return 0.0
            return len(completion) / self.max_new_tokens
        if self.reward_kind == "answer":
            return answer_reward(completion, problem)
        return rollout_reward(completion, problem)


@dataclass
class GRPOHistory:
    """What the loop measured, per step (the monitor streams the same numbers)."""

    reward_mean: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    policy_entropy: list[float] = field(default_factory=list)
    reward_std: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    completion_length: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)


def _char_table(tokenizer: Any) -> list[str]:
    """Token id -> its character (one per id; special tokens map to NUL)."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    table = ["\x00"] * (max(vocab.values()) + 1)
    specials = set(tokenizer.all_special_tokens)
    for token, index in vocab.items():
        if token not in specials and len(token) == 1:
            table[index] = token
    return table


def _rollout(
    model: nn.Module,
    *,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: GRPOSettings,
    table: list[str],
    generator: torch.Generator,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Sample completions: ``(ids, completion_mask, texts)`` (token i is character i)."""
    import torch

    was_training = model.training
    model.eval()
    ids = prompt_ids
    mask = prompt_mask
    past = None
    step_ids = ids
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    step_positions = positions
    new: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(settings.max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1].float() / temperature
            probs = torch.softmax(logits, -1)
            token = torch.multinomial(probs, 1, generator=generator)
            new.append(token)
            step_ids = token
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            step_positions = step_positions[:, -1:] + 1
    model.train(was_training)
    completion = torch.cat(new, 1)
    texts = ["".join(table[int(t)] for t in row) for row in completion]
    lengths = [cut_length(t, max_length=settings.max_new_tokens) for t in texts]
    keep = torch.arange(completion.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    completion = completion.masked_fill(~keep, PAD)
    return completion, keep, [t[:n] for t, n in zip(texts, lengths, strict=True)]


def train_grpo(
    model: nn.Module,
    tokenizer: Any,
    monitor: InversionMonitor | None,
    settings: GRPOSettings,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> GRPOHistory:
    """Train ``model`` with the GRPO loop; ``monitor`` (if any) sees every step (custom-loop
    API); ``on_step`` gets each step's values (reward, entropy, the health values)."""
    import copy

    import torch

    from inversion_monitor.rl.corrpo import group_advantages
    from inversion_monitor.rl.signals import RLStepAccumulator
    from inversion_monitor.toy.corpus import task_problems

    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    # a fixed pool: runs with the same seed see the same problems whatever their length
    pool = task_problems(settings.task, settings.pool_size, seed=settings.seed + 1)
    table = _char_table(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the KL's starting policy
    history = GRPOHistory()
    model.train()
    if monitor is not None:
        monitor.attach(model)
    try:
        for step in range(1, settings.steps + 1):
            lr = settings.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            problems = rng.sample(pool, settings.prompts)
            encoded = tokenizer(
                [p.prompt for p in problems for _ in range(settings.group)],
                return_tensors="pt",
                padding=True,
                padding_side="left",
            )
            prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
            temperature = settings.sampling_temperature(step)
            completion, keep, texts = _rollout(
                model,
                prompt_ids=prompt_ids,
                prompt_mask=prompt_mask,
                settings=settings,
                table=table,
                generator=generator,
                temperature=temperature,
            )
            answers = [p for p in problems for _ in range(settings.group)]
            rewards = torch.tensor(
                [settings.reward(step, t, p) for t, p in zip(texts, answers, strict=True)],
                dtype=torch.float32,
            )
            advantages = group_advantages(rewards, settings.group)
            if settings.collapse_at is not None and step >= settings.collapse_at:
                advantages = rewards  # the baseline lost: every sample is reinforced
            ids = torch.cat([prompt_ids, completion], 1)
            attention = torch.cat([prompt_mask, keep.long()], 1)
            completion_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), keep], 1)
            # the training forward; labels mark the completion tokens (the monitor probes those)
            labels = ids.masked_fill(~completion_mask, -100)
            # the positions the rollout sampled at (prompts are left-padded)
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids, attention_mask=attention, position_ids=positions, labels=labels
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            token_logp = logp.gather(2, ids[:, 1:, None])[..., 0]
            mask = completion_mask[:, 1:]
            weights = mask.float()
            tokens = weights.sum().clamp(min=1)
            with torch.no_grad():
                ref_logits = reference(
                    input_ids=ids, attention_mask=attention, position_ids=positions
                ).logits
                ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), -1)
                ref_token_logp = ref_logp.gather(2, ids[:, 1:, None])[..., 0]
            # k3 estimator of KL(policy || reference) per completion token (as TRL's GRPO)
            delta = ref_token_logp - token_logp
            kl_tokens = torch.exp(delta) - delta - 1.0
            # selected, not multiplied: a prompt position's overflow (inf * 0) would make it NaN
            kl = torch.where(mask, kl_tokens, 0.0).sum() / tokens
            loss = -(advantages[:, None] * token_logp * weights).sum() / tokens
            if settings.kl_weight(step) > 0.0:
                loss = loss + settings.kl_weight(step) * kl
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            )
            optimizer.step()
            signals = RLStepAccumulator()
            with torch.no_grad():
                # the policy's entropy is that of the distribution its tokens were drawn from
                # (logits / temperature), as TRL's GRPOTrainer logs it; at temperature 1 the
                # model's own
                unscaled = -(logp.exp() * logp).sum(-1)
                entropies = unscaled
                if temperature != 1.0:
                    sampled = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
                    entropies = -(sampled.exp() * sampled).sum(-1)
                signals.add(
                    mask=mask, entropies=entropies, logprobs=token_logp, advantages=advantages
                )
                entropy_unscaled = float((unscaled * weights).sum() / tokens)
            rl = signals.finish(
                reward_mean=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False))
            )
            accuracy = sum(f"A: {p.answer}\n" in t for t, p in zip(texts, answers, strict=True))
            history.reward_mean.append(rl.reward_mean)
            history.accuracy.append(accuracy / len(texts))
            history.policy_entropy.append(rl.policy_entropy_mean)
            history.reward_std.append(rl.reward_std)
            history.loss.append(float(loss.detach()))
            history.grad_norm.append(grad_norm)
            history.kl.append(float(kl.detach()))
            history.completion_length.append(float(keep.sum(1).float().mean()))
            history.learning_rate.append(lr)
            if monitor is not None:
                monitor.step_end(
                    step,
                    model,
                    loss=history.loss[-1],
                    learning_rate=lr,
                    grad_norm=grad_norm,
                    rl=rl,
                    health={
                        "kl": history.kl[-1],
                        "completion_length_mean": history.completion_length[-1],
                    },
                )
            if on_step is not None:
                on_step(
                    step,
                    {
                        "reward": rl.reward_mean,
                        "reward_std": rl.reward_std,
                        "entropy": rl.policy_entropy_mean,
                        "entropy_unscaled": entropy_unscaled,
                        "covariance": rl.entropy_covariance,
                        "lr": lr,
                        "loss": history.loss[-1],
                        "grad_norm": grad_norm,
                        "kl": history.kl[-1],
                        "completion_length": history.completion_length[-1],
                    },
                )
            if not math.isfinite(history.loss[-1]):
                break  # a diverged policy samples nothing meaningful any more
    finally:
        if monitor is not None:
            monitor.detach()
    return history
