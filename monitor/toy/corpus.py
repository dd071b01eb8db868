"""A synthetic reasoning corpus: multi-step arithmetic with worked steps.

Each problem chains a few additions/subtractions/multiplications; the
completion works through them one step at a time and ends with the answer, so
a model trained on it sees both "forks" (choosing the next operand) and
"committed" tokens (carrying out a step), and the answer can be checked (for
reward-based training).

Two task families (:data:`Task`): ``"chain"`` (:func:`arithmetic_problems`,
the default everywhere) and ``"facts"`` (:func:`fact_problems`: one operation
on two operands 2..12, "Q: 7*12=?"), which a tiny model partly learns in a few
hundred SFT steps, so a correctness reward has signal to learn from.

>>> p = arithmetic_problems(1, seed=3)[0]
>>> p.prompt.startswith("Q: ") and p.completion.endswith(f"A: {p.answer}\\n")
True
>>> reasoning_corpus(2, seed=0) == reasoning_corpus(2, seed=0)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Task = Literal["chain", "facts"]
TASKS: tuple[Task, ...] = ("chain", "facts")

_OPS = ("+", "-", "*")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: ``prompt`` asks, ``completion`` reasons step by step.

    >>> p = ArithmeticProblem(prompt="Q: 1+2=?\\n", completion="1+2=3.\\nA: 3\\n", answer=3)
    >>> p.text
    'Q: 1+2=?\\n1+2=3.\\nA: 3\\n'
    """

    prompt: str
    completion: str
    answer: int

    @property
    def text(self) -> str:
        """Prompt and completion joined: one training example."""
        return self.prompt + self.completion


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def arithmetic_problems(
    n: int, *, seed: int = 0, min_steps: int = 2, max_steps: int = 4
) -> list[ArithmeticProblem]:
    """Make ``n`` deterministic problems with ``min_steps..max_steps`` operations.

    Uses its own ``random.Random(seed)``; the global RNG is never touched.

    >>> [p.answer for p in arithmetic_problems(3, seed=1)] == [
    ...     p.answer for p in arithmetic_problems(3, seed=1)]
    True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(
            f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}"
        )
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        steps = rng.randint(min_steps, max_steps)
        value = rng.randint(2, 60)
        expression = str(value)
        lines = []
        for _ in range(steps):
            op = rng.choice(_OPS)
            operand = rng.randint(2, 9) if op == "*" else rng.randint(2, 60)
            result = _apply(op, value, operand)
            lines.append(f"{value}{op}{operand}={result}.")
            expression = (
                f"({expression}){op}{operand}" if op == "*" else f"{expression}{op}{operand}"
            )
            value = result
        prompt = f"Q: {expression}=?\n"
        completion = "\n".join(lines) + f"\nA: {value}\n"
        problems.append(ArithmeticProblem(prompt=prompt, completion=completion, answer=value))
    return problems


def fact_problems(n: int, *, seed: int = 0, max_operand: int = 12) -> list[ArithmeticProblem]:
    """``n`` one-operation problems on operands ``2..max_operand`` ("Q: 7*5=?").

    The completion is the worked line and the answer, as in :func:`arithmetic_problems`.
    Uses its own ``random.Random(seed)``.

    >>> p = fact_problems(1, seed=0)[0]
    >>> p.text == f"{p.prompt}{p.completion}" and p.completion.endswith(f"A: {p.answer}\\n")
    True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 2:
        raise ValueError(f"max_operand must be >= 2, got {max_operand}")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b, op = rng.randint(2, max_operand), rng.randint(2, max_operand), rng.choice(_OPS)
        result = _apply(op, a, b)
        problems.append(
            ArithmeticProblem(
                prompt=f"Q: {a}{op}{b}=?\n",
                completion=f"{a}{op}{b}={result}.\nA: {result}\n",
                answer=result,
            )
        )
    return problems


def task_problems(task: Task, n: int, *, seed: int = 0) -> list[ArithmeticProblem]:
    """``n`` problems of the family ``task`` (``"chain"`` or ``"facts"``).

    >>> task_problems("facts", 2, seed=1) == fact_problems(2, seed=1)
    True
    """
    if task == "chain":
        return arithmetic_problems(n, seed=seed)
    if task == "facts":
        return fact_problems(n, seed=seed)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def reasoning_corpus(n: int, *, seed: int = 0, task: Task = "chain") -> list[str]:
    """``n`` training texts (prompt plus worked completion) of the family ``task``."""
    return [p.text for p in task_problems(task, n, seed=seed)]
