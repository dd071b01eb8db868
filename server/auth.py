"""Who may call what: bearer tokens scoped to projects, read-only or read-write.

Tokens come from ``--token`` (full access: every project, read-write, as
before scopes existed) and from a token file (``--token-file``, YAML or TOML)::

    [[tokens]]
    token = "team-a-writer"
    projects = ["team-a"]
    access = "read-write"

    [[tokens]]
    token = "dashboards"
    projects = ["*"]          # every project
    access = "read-only"

Without any token the server does not authenticate (every caller has full
access). A read-only token may call ListRuns and GetRun; OpenRun, Push and
CloseRun need read-write. ListRuns and GetRun show only the token's projects.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inversion_monitor.server.settings_file import ServerConfigError, parse_settings_file

ALL_PROJECTS = "*"
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")


def check_token(token: str) -> str:
    """A token as the wire carries it: printable ASCII, no spaces or commas."""
    token = str(token).strip()
    if not _TOKEN_RE.fullmatch(token) or "," in token:
        raise ValueError("a token must be non-empty printable ASCII without spaces or commas")
    return token


class TokenScope(BaseModel):
    """One token of the token file: the projects it reaches and its access.

    >>> TokenScope(token="t1", projects=["a"], access="read-only").grant().allows("a")
    True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: str
    # project names; "*" means every project (the empty project included)
    projects: tuple[str, ...] = Field(default=(ALL_PROJECTS,), min_length=1)
    access: Literal["read-only", "read-write"] = "read-write"

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: str) -> str:
        return check_token(value)

    def grant(self) -> Grant:
        projects = None if ALL_PROJECTS in self.projects else frozenset(self.projects)
        return Grant(projects, self.access == "read-write")


class TokenFile(BaseModel):
    """The token file: a list of :class:`TokenScope` under ``tokens``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: tuple[TokenScope, ...] = Field(min_length=1)


def load_token_file(path: Path) -> tuple[TokenScope, ...]:
    """The scopes in ``path``; a ``ValueError`` naming the entry and field that is wrong."""
    try:
        data: Any = parse_settings_file(path, "--token-file")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    except ServerConfigError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/mapping with a 'tokens' list")
    try:
        parsed = TokenFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"{path}: {problems}") from None
    seen: set[str] = set()
    for i, scope in enumerate(parsed.tokens):
        if scope.token in seen:
            raise ValueError(f"{path}: tokens.{i}.token: the same token is listed twice")
        seen.add(scope.token)
    return parsed.tokens


@dataclass(frozen=True, slots=True)
class Grant:
    """What one caller may do: ``projects`` None means every project.

    >>> Grant(frozenset({"a"}), write=False).allows("b")
    False
    """

    projects: frozenset[str] | None
    write: bool

    def allows(self, project: str) -> bool:
        return self.projects is None or project in self.projects

    def describe(self) -> str:
        if self.projects is None:
            return "every project"
        return "project(s) " + ", ".join(sorted(repr(p) for p in self.projects))

    def check_write(self, project: str) -> None:
        """Raise PERMISSION_DENIED unless this grant may write to ``project``."""
        from inversion_monitor.server.errors import PermissionDenied

        if not self.write:
            raise PermissionDenied(
                "this token is read-only: OpenRun, Push and CloseRun need a read-write token"
            )
        if not self.allows(project):
            raise PermissionDenied(
                f"this token may not write to project {project[:128]!r}; it reaches "
                f"{self.describe()}"
            )


FULL_ACCESS = Grant(None, True)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Authorizer:
    """Maps ``authorization: Bearer <token>`` metadata to a :class:`Grant`.

    Tokens are kept as SHA-256 digests and looked up by digest, so the time a
    lookup takes tells nothing about the configured tokens.

    >>> auth = Authorizer(["full"], [TokenScope(token="ro", projects=["a"], access="read-only")])
    >>> auth.grant((("authorization", "Bearer ro"),))
    Grant(projects=frozenset({'a'}), write=False)
    >>> auth.grant((("authorization", "Bearer nope"),)) is None
    True
    """

    def __init__(self, tokens: Iterable[str] = (), scopes: Iterable[TokenScope] = ()) -> None:
        self._grants: dict[bytes, Grant] = {}
        for scope in scopes:
            self._grants[_digest(scope.token.encode())] = scope.grant()
        for token in tokens:  # --token: full access (wins over a scope of the same token)
            self._grants[_digest(token.encode())] = FULL_ACCESS

    @property
    def enabled(self) -> bool:
        """False without tokens: no authentication, every caller has full access."""
        return bool(self._grants)

    def grant(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Grant | None:
        """The caller's grant; None when the token is missing or unknown."""
        if not self._grants:
            return FULL_ACCESS
        for key, value in metadata or ():
            if key != "authorization":
                continue
            raw = value.encode() if isinstance(value, str) else value
            scheme, _, token = raw.partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return self._grants.get(_digest(token.strip()))
        return None
