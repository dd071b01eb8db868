"""JSON parsing with bounded nesting, for text a client sent (``RunInfo.config_json``).

``json.loads`` recurses once per level: thousands of ``[`` exhaust the stack
(a ``RecursionError``, not a ``ValueError``), and whatever walks the result
recurses as deep again. :func:`loads_bounded` measures the nesting first, in
linear time and without recursion, and refuses text deeper than ``max_depth``
with a ``ValueError`` (the caller's INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 64
# a JSON string, or one bracket. Linear: the alternatives inside a string never overlap and
# the loop is possessive; a string always matches (unterminated: to the end of the text),
# so no character is scanned by two attempts.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\[\s\S]?)*+(?:"|\Z)|[\[\]{}]')


def json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``text``'s arrays and objects nest, counting stops past ``limit``.

    Brackets inside strings do not count; the text need not be valid JSON.

    >>> json_depth('{"a": [1, {"b": "[[["}]}'), json_depth("3")
    (3, 0)
    >>> json_depth("[" * 10_000, limit=64)
    65
    """
    depth = deepest = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif char in "]}":
            depth -= 1
    return deepest


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, or a ``ValueError`` when it nests deeper than ``max_depth``.

    >>> loads_bounded('{"lr": [0.1]}')
    {'lr': [0.1]}
    >>> loads_bounded("[" * 500 + "]" * 500)
    Traceback (most recent call last):
    ...
    ValueError: nested deeper than 64 levels of arrays and objects
    """
    if json_depth(text, max_depth) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels of arrays and objects")
    return json.loads(text)
