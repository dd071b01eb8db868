"""Redaction of values that look like secrets in run labels and ``config_json``.

Applied before a run's metadata is stored or kept in memory, so a secret a
user put in a label (``wandb_api_key=...``) or in the monitor configuration
never reaches the database, ListRuns, GetRun or /metrics. A value is redacted
when its key names a secret (``token``, ``secret``, ``password``, ``api_key``,
``key``, ``credential``, ``auth``, ...) and the value is text, or when the
value itself has the shape of a known credential (``sk-...``, ``hf_...``,
``ghp_...``, ``AKIA...``, a JWT, a private key block, a password in a URL).
"""

from __future__ import annotations

import json
import re
from typing import Any

from inversion_monitor.proto.v1 import monitor_pb2

REDACTED = "[redacted]"

# key words (after splitting on _ - . space and camelCase) that name a secret
_SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "secrets",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "apikey",
        "key",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
        "privatekey",
        "dsn",
    }
)
_SECRET_JOINED = ("apikey", "accesskey", "secretkey", "privatekey", "authtoken", "accesstoken")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_SECRET_VALUE = re.compile(
    r"(?:"
    r"\bsk-[A-Za-z0-9_-]{16,}"  # OpenAI / Anthropic style
    r"|\bhf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bglpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r")"
)
# scheme://user:password@host -> scheme://user:[redacted]@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+(?=@)")


def secret_key(key: str) -> bool:
    """True when a key names a secret.

    >>> [secret_key(k) for k in ("wandb_api_key", "HF_TOKEN", "tokenizer", "tokens_per_probe")]
    [True, True, False, False]
    >>> [secret_key(k) for k in ("dbPassword", "monkey", "key", "sort_key")]
    [True, False, True, True]
    """
    words = [w.lower() for w in _WORD_SPLIT.split(key) if w]
    if any(w in _SECRET_WORDS for w in words):
        return True
    joined = "".join(words)
    return any(part in joined for part in _SECRET_JOINED)


def redact_text(value: str) -> str:
    """``value`` with credential-shaped parts replaced (URL passwords keep the rest).

    >>> redact_text("postgres://bob:hunter2@db:5432/x")
    'postgres://bob:[redacted]@db:5432/x'
    >>> redact_text("key sk-abcdefghijklmnopqrstuv")
    '[redacted]'
    >>> redact_text("gpt2")
    'gpt2'
    """
    if _SECRET_VALUE.search(value):
        return REDACTED
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, value)


def _redact_json(value: Any, key: str | None) -> Any:
    if isinstance(value, dict):
        return {k: _redact_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_json(v, key) for v in value]
    if isinstance(value, str):
        if key is not None and secret_key(key) and value:
            return REDACTED
        return redact_text(value)
    return value


def redact_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels with secret-looking values redacted.

    >>> redact_labels({"team": "nlp", "wandb_api_key": "0123abcd"})
    {'team': 'nlp', 'wandb_api_key': '[redacted]'}
    """
    return {k: (REDACTED if v and secret_key(k) else redact_text(v)) for k, v in labels.items()}


def redact_config_json(text: str) -> str:
    """``config_json`` with secret-looking values redacted (re-serialised only if changed).

    >>> redact_config_json('{"lr": 0.1, "hub": {"hf_token": "abc"}}')
    '{"lr": 0.1, "hub": {"hf_token": "[redacted]"}}'
    >>> redact_config_json('{"tokens_per_probe": 64}')
    '{"tokens_per_probe": 64}'
    """
    if not text:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        return redact_text(text)
    redacted = _redact_json(parsed, None)
    return text if redacted == parsed else json.dumps(redacted)


def redact_run_info(info: monitor_pb2.RunInfo) -> None:
    """Redact ``info``'s labels and ``config_json`` in place."""
    labels = redact_labels(dict(info.labels))
    if labels != dict(info.labels):
        info.labels.clear()
        info.labels.update(labels)
    config_json = redact_config_json(info.config_json)
    if config_json != info.config_json:
        info.config_json = config_json
