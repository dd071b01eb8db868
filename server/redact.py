"""Redaction of values that look like secrets in run labels and ``config_json``.

Applied before a run's metadata is stored or kept in memory, so a secret a
user put in a label (``wandb_api_key=...``) or in the monitor configuration
never reaches the database, ListRuns, GetRun or /metrics. A value is redacted
when its key names a secret (``token``, ``secret``, ``password``, ``api_key``,
``key``, ``credential``, ``auth``, ...): the whole value, of any type (a
nested object, a number), except where the key's only secret word is an
ambiguous ``token`` or ``key`` that is not its last word (``token_samples``,
``key_dim`` are settings; their text values are still redacted). A text value
is also redacted when it has the shape of a known credential (``sk-...``,
``hf_...``, ``ghp_...``, ``AKIA...``, a JWT, a private key block, a password in
a URL). Every pattern runs in linear time: a long value cannot stall the server.
"""

from __future__ import annotations

import json
import re
from typing import Any

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.jsonsafe import loads_bounded

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
        "pw",
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
# words that name a secret only as a key's last word when the value is not text
_AMBIGUOUS_WORDS = frozenset({"token", "key"})
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
    # a JWT: attempts start only where a run of [A-Za-z0-9_-] starts, so each run is
    # scanned by at most three attempts (``\b`` would start one at every "-eyJ": quadratic)
    r"|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r")"
)
# scheme://user:password@host -> scheme://user:[redacted]@host. Linear: an attempt starts
# only at "://" (after a scheme character), and neither the user nor the possessive password
# part crosses a "/", so each character is scanned by at most one attempt.
_URL_PASSWORD = re.compile(r"(?<=[A-Za-z0-9+.-])(?P<head>://[^/\s:@]++:)[^/\s@]++(?=@)")


def secret_key(key: str) -> bool:
    """True when a key names a secret.

    >>> [secret_key(k) for k in ("wandb_api_key", "HF_TOKEN", "tokenizer", "tokens_per_probe")]
    [True, True, False, False]
    >>> [secret_key(k) for k in ("dbPassword", "monkey", "key", "sort_key")]
    [True, False, True, True]
    """
    return _secret_words(key, strict=False)


def _secret_words(key: str, *, strict: bool) -> bool:
    """``strict``: an ambiguous word (``token``, ``key``) counts only as the last word."""
    words = [w.lower() for w in _WORD_SPLIT.split(key) if w]
    last = len(words) - 1
    for i, word in enumerate(words):
        if word in _SECRET_WORDS and not (strict and word in _AMBIGUOUS_WORDS and i != last):
            return True
    joined = "".join(words)
    return any(part in joined for part in _SECRET_JOINED)


def secret_value_key(key: str) -> bool:
    """True when a key names a secret whatever its value's type (a number, an object).

    >>> [secret_value_key(k) for k in ("password", "db_password", "auth", "hf_token")]
    [True, True, True, True]
    >>> [secret_value_key(k) for k in ("token_samples", "per_token_type", "key_dim")]
    [False, False, False]
    """
    return _secret_words(key, strict=True)


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
    """``value`` with secrets redacted; its depth is bounded by :func:`loads_bounded`."""
    named = key is not None and value is not None and value != "" and secret_key(key)
    if named and (isinstance(value, str) or secret_value_key(str(key))):
        return REDACTED  # the whole value, whatever its type
    if isinstance(value, dict):
        return {k: _redact_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_json(v, key) for v in value]
    if isinstance(value, str):
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
    >>> redact_config_json('{"db_password": {"prod": "x"}, "auth": {"pw": "y"}, "password": 1}')
    '{"db_password": "[redacted]", "auth": "[redacted]", "password": "[redacted]"}'
    """
    if not text:
        return text
    try:
        parsed = loads_bounded(text)
    except ValueError:  # not JSON, or nested too deep: redact it as text
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
