"""A synthetic reasoning corpus: multi-step arithmetic with worked steps.

Each problem chains a few additions/subtractions/multiplications; the
completion works through them one step at a time and ends with the answer, so
a model trained on it sees both "forks" (choosing the next operand) and
"committed" tokens (carrying out a step), and the answer can be checked (for
reward-based training).

>>> p = arithmetic_problems(1, seed=3)[0]
>>> p.prompt.startswith("Q: ") and p.completion.endswith(f"A: {p.answer}\\n")
True
>>> reasoning_corpus(2, seed=0) == reasoning_corpus(2, seed=0)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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


def reasoning_corpus(n: int, *, seed: int = 0) -> list[str]:
    """``n`` training texts (prompt plus worked completion)."""
    return [p.text for p in arithmetic_problems(n, seed=seed)]
