"""Tiny, offline building blocks for docstring examples, demos, tests and benchmarks.

Everything here is made locally from code: a character-level tokenizer, a
synthetic multi-step arithmetic corpus with worked steps, and tiny randomly
initialised causal LMs built from configs. Nothing is downloaded.
"""

from inversion_monitor.toy.corpus import (
    ArithmeticProblem,
    arithmetic_problems,
    fact_problems,
    reasoning_corpus,
    task_problems,
)

__all__ = [
    "ArithmeticProblem",
    "arithmetic_problems",
    "fact_problems",
    "reasoning_corpus",
    "task_problems",
]
