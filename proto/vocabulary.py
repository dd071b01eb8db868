"""The contract's words: the values the wire's free-text fields may take, defined once.

``RunInfo.kind`` and ``ComponentStat.projection`` are strings on the wire
(``proto/v1/monitor.proto``); the client (:mod:`inversion_monitor.config`, the
probe) and the server (:mod:`inversion_monitor.server.validate`) both read
their allowed values here.

>>> RUN_KINDS, PROJECTIONS
(('sft', 'rl', 'custom'), ('q', 'k', 'v', 'o'))
>>> one_of(PROJECTIONS)
"'q', 'k', 'v', 'o'"
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

RunKind = Literal["sft", "rl", "custom"]
"""What a run trains: supervised fine-tuning, reinforcement learning, or anything else."""

Projection = Literal["q", "k", "v", "o"]
"""An attention projection: query, key, value or output."""

RUN_KINDS: tuple[RunKind, ...] = get_args(RunKind)
PROJECTIONS: tuple[Projection, ...] = get_args(Projection)


def one_of(words: Iterable[str]) -> str:
    """``words`` quoted and comma-separated, for an error message."""
    return ", ".join(map(repr, words))
