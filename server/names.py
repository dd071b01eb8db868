"""Identifiers and label values: what the wire accepts and what /metrics shows."""

from __future__ import annotations

import re

# use with fullmatch: "$" would also match before a final newline
RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LABEL_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
DISPLAY_NAME_MAX = 48


def valid_run_id(run_id: str) -> bool:
    """True for 1..64 characters of ``[A-Za-z0-9_.-]``.

    >>> valid_run_id("3f2a-run_1.b"), valid_run_id(""), valid_run_id("a b"), valid_run_id("a\\n")
    (True, False, False, False)
    """
    return RUN_ID_RE.fullmatch(run_id) is not None


def base_display_name(name: str, run_id: str) -> str:
    """A Prometheus-friendly name: runs of other characters become ``-``, at most 48 chars.

    >>> base_display_name("GPT-2 small / lr=3e-4", "ab12")
    'GPT-2-small-lr-3e-4'
    >>> base_display_name("", "0123456789abcdef")
    'run-01234567'
    """
    base = _UNSAFE.sub("-", name).strip("-._")[:DISPLAY_NAME_MAX].rstrip("-._")
    if not base:
        base = "run-" + (_UNSAFE.sub("", run_id)[:8] or "x")
    return base


def clean_label_value(value: str, max_length: int = 128) -> str:
    """Text safe for a label value: control characters become spaces, length capped.

    >>> clean_label_value("team\\nA\\t" + "x" * 200)[:8], len(clean_label_value("y" * 500))
    ('team A x', 128)
    """
    return _CONTROL.sub(" ", value)[:max_length]
