"""Server configuration: one validated pydantic model, from flags, environment or code.

Precedence: command-line argument > environment variable
(``INVERSION_MONITOR_SERVER_<FIELD>``) > default. A bad value from either
source raises :class:`ServerConfigError` naming the flag or variable and what it
expects; the server never starts with a configuration it did not understand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inversion_monitor.server.auth import TokenScope, check_token, load_token_file
from inversion_monitor.server.database import (
    PostgresUrl,
    is_postgres_url,
    parse_postgres_url,
    redact_url,
)
from inversion_monitor.server.settings_file import ServerConfigError

ENV_PREFIX = "INVERSION_MONITOR_SERVER_"
DEFAULT_DB = "inversion-monitor.db"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float) -> float:
    """Seconds from a number or a duration string (``90``, ``90s``, ``15m``, ``1h``, ``2d``).

    >>> parse_duration("15m"), parse_duration(30), parse_duration("1.5h")
    (900.0, 30.0, 5400.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if match is None:
            raise ValueError(
                f"expected seconds or a duration such as 90s, 15m, 1h, 2d; got {value!r}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration; got {value!r}")
    return seconds


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``[IPv6]:PORT``; port 0 means any free port.

    >>> split_address("127.0.0.1:0"), split_address("[::1]:50051")
    (('127.0.0.1', 0), ('::1', 50051))
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:50051); got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535; got {port} in {address!r}")
    return host, port


def join_address(host: str, port: int) -> str:
    """The inverse of :func:`split_address` (brackets IPv6 hosts)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Limits(BaseModel):
    """Bounds on what one client may send; each is named in the error that enforces it.

    >>> Limits().max_records_per_push
    1000
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_records_per_push: int = Field(default=1000, ge=1)
    max_active_runs: int = Field(default=10_000, ge=1)
    max_labels: int = Field(default=32, ge=0)
    max_label_key_length: int = Field(default=64, ge=1)
    max_label_value_length: int = Field(default=256, ge=1)
    max_components: int = Field(default=1024, ge=0)
    max_samples: int = Field(default=4096, ge=0)
    max_ranks_per_run: int = Field(default=65_536, ge=1)
    # a sequence number further than this ahead of the acknowledged one is refused
    max_sequence_gap: int = Field(default=100_000, ge=1)
    # pushes waiting for the writer before new ones are shed with RESOURCE_EXHAUSTED
    max_pending_pushes: int = Field(default=512, ge=1)
    max_history: int = Field(default=10_000, ge=1)
    # per-run metadata kept in memory: RunInfo.config_json characters
    max_config_json_length: int = Field(default=65_536, ge=2)
    # protobuf bytes of history one GetRun (or /api/runs/<run>) answers: the newest records
    # that fit (under the gRPC send limit); /api/runs/<run>?samples=0 counts them without samples
    max_history_bytes: int = Field(default=16 << 20, ge=1024, le=60 << 20)
    # RPCs handled at once (more get RESOURCE_EXHAUSTED) and bytes of Push requests held
    # at once (one over it is refused with RESOURCE_EXHAUSTED, the client retries)
    max_concurrent_rpcs: int = Field(default=256, ge=1)
    max_inflight_push_bytes: int = Field(default=128 << 20, ge=1024)
    # HTTP: open connections (at most a quarter of the open-file limit), seconds a socket
    # read or write may wait, and seconds a connection may stay open in all
    max_http_connections: int = Field(default=128, ge=1)
    http_timeout_s: float = Field(default=10.0, gt=0)
    http_connection_max_s: float = Field(default=60.0, gt=0)


class ServerConfig(BaseModel):
    """Everything the server needs; validated on construction.

    >>> cfg = ServerConfig(grpc_address="127.0.0.1:0", retention="15m", tokens=["s3cret"])
    >>> cfg.retention_s, cfg.grpc_host_port, cfg.tls
    (900.0, ('127.0.0.1', 0), False)
    >>> ServerConfig(grpc_address="nope")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    pydantic_core._pydantic_core.ValidationError: ...
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        arbitrary_types_allowed=True,
        # a rejected value may be a database URL with its password: errors never echo input
        hide_input_in_errors=True,
    )

    grpc_address: str = "127.0.0.1:50051"
    # None: no HTTP endpoint (no /metrics, no /healthz)
    http_address: str | None = "127.0.0.1:9464"
    # SQLite database file (created if missing; ":memory:" keeps nothing across restarts), or
    # a PostgreSQL database postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME that several
    # servers may share (printed without its password)
    db: Path | PostgresUrl = Path(DEFAULT_DB)
    # full-access tokens (every project, read-write)
    tokens: tuple[str, ...] = ()
    # YAML/TOML file of tokens scoped to projects, read-only or read-write (see .auth)
    token_file: Path | None = None
    # the scopes read from token_file (or given in code)
    scoped_tokens: tuple[TokenScope, ...] = ()
    # a writer session idle (no OpenRun/Push) this long may be replaced without takeover
    writer_idle_timeout_s: float = Field(default=300.0, alias="writer_idle_timeout")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # seconds a run stays on /metrics after its last activity
    retention_s: float = Field(default=3600.0, alias="retention")
    limits: Limits = Limits()
    # adds CI bounds, entropy percentiles, loss and run_info per run to /metrics
    extended_metrics: bool = False
    # adds per-(layer, projection) rho and score series, at most component_series_per_run a run
    component_metrics: bool = False
    component_series_per_run: int = Field(default=32, ge=1, le=1024)
    # detector settings file (YAML or TOML); None: the defaults
    alerts_config: Path | None = None
    # False: no server-side detectors (no alerts)
    alerts: bool = True
    # base URL of an Alertmanager (e.g. http://127.0.0.1:9093) to post alerts to
    alertmanager_url: str | None = None
    # grace period for in-flight calls on shutdown
    shutdown_grace_s: float = Field(default=5.0, ge=0)
    # True: /metrics (it names every project's runs) answers only requests carrying a
    # token that reads every project ('Authorization: Bearer <token>'; Prometheus:
    # authorization.credentials); needs tokens. False: /metrics is open, as /healthz is
    metrics_token: bool = False
    # without tokens, /api answers only requests whose Host is an IP address, localhost,
    # the HTTP address's host or one of these names (a DNS-rebinding guard)
    allowed_hosts: tuple[str, ...] = ()

    @field_validator("grpc_address")
    @classmethod
    def _check_grpc_address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("http_address")
    @classmethod
    def _check_http_address(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "off", "none"):
            return None
        split_address(value)
        return value

    @field_validator("db", mode="before")
    @classmethod
    def _check_db(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            if not is_postgres_url(value):
                raise ValueError(
                    f"{redact_url(value)}: the scheme must be postgresql:// (or give a "
                    "SQLite file path)"
                )
            return parse_postgres_url(value)
        return value

    @field_validator("retention_s", mode="before")
    @classmethod
    def _check_retention(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("tokens", mode="before")
    @classmethod
    def _check_tokens(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [t for t in value.split(",") if t.strip()]
        return tuple(check_token(t) for t in value)

    @field_validator("writer_idle_timeout_s", mode="before")
    @classmethod
    def _check_idle_timeout(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="before")
    @classmethod
    def _load_token_file(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("token_file") is not None
            and "scoped_tokens" not in data
        ):
            path = Path(data["token_file"])
            scopes = load_token_file(path)
            data = {**data, "scoped_tokens": scopes}
        return data

    @field_validator("alertmanager_url")
    @classmethod
    def _check_alertmanager_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("the Alertmanager URL must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_tls(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {str(path)!r} does not exist")
        return self

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return tuple(str(h).strip().lower() for item in value for h in str(item).split(","))
        return value

    @model_validator(mode="after")
    def _check_metrics_token(self) -> ServerConfig:
        if self.metrics_token and not (self.tokens or self.scoped_tokens):
            raise ValueError("metrics_token needs tokens: give --token or --token-file")
        return self

    @property
    def grpc_host_port(self) -> tuple[str, int]:
        return split_address(self.grpc_address)

    @property
    def http_host_port(self) -> tuple[str, int] | None:
        return None if self.http_address is None else split_address(self.http_address)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_sources(cls, arguments: Mapping[str, Any], environ: Mapping[str, str]) -> ServerConfig:
        """Merge ``arguments`` (None = not given) over ``INVERSION_MONITOR_SERVER_*`` variables.

        >>> env = {"INVERSION_MONITOR_SERVER_RETENTION": "2h",
        ...        "INVERSION_MONITOR_SERVER_TOKEN": "a,b"}
        >>> cfg = ServerConfig.from_sources({"grpc_address": "127.0.0.1:0"}, env)
        >>> cfg.retention_s, cfg.tokens
        (7200.0, ('a', 'b'))
        """
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        limit_values: dict[str, Any] = {}
        for field, env_name in _ENV_FIELDS.items():
            given = arguments.get(field)
            if given is not None and given not in ([], ()):
                flag = "--token" if field == "tokens" else f"--{field.replace('_', '-')}"
                value, source = given, flag
            elif ENV_PREFIX + env_name in environ:
                value, source = environ[ENV_PREFIX + env_name], ENV_PREFIX + env_name
            else:
                continue
            if field in Limits.model_fields:
                limit_values[field] = value
            else:
                values[field] = value
            sources[field] = source
        if values.get("token_file") is not None:
            try:
                values["scoped_tokens"] = load_token_file(Path(values["token_file"]))
            except ValueError as exc:
                raise ServerConfigError(
                    f"invalid server configuration: {sources['token_file']}: {exc}"
                ) from None
        if "tokens" in values and isinstance(values["tokens"], (list, tuple)):
            values["tokens"] = [t for item in values["tokens"] for t in str(item).split(",")]
        try:
            if limit_values:
                values["limits"] = Limits(**limit_values)
            return cls(**values)
        except ValidationError as exc:
            raise ServerConfigError(_explain(exc, sources)) from None


# config field -> environment variable suffix
_ENV_FIELDS: dict[str, str] = {
    "grpc_address": "GRPC_ADDRESS",
    "http_address": "HTTP_ADDRESS",
    "db": "DB",
    "tokens": "TOKEN",
    "token_file": "TOKEN_FILE",
    "writer_idle_timeout": "WRITER_IDLE_TIMEOUT",
    "tls_cert": "TLS_CERT",
    "tls_key": "TLS_KEY",
    "retention": "RETENTION",
    "extended_metrics": "EXTENDED_METRICS",
    "component_metrics": "COMPONENT_METRICS",
    "max_message_bytes": "MAX_MESSAGE_BYTES",
    "max_records_per_push": "MAX_RECORDS_PER_PUSH",
    "max_active_runs": "MAX_ACTIVE_RUNS",
    "alerts_config": "ALERTS_CONFIG",
    "alertmanager_url": "ALERTMANAGER_URL",
    "alerts": "ALERTS",
    "metrics_token": "METRICS_TOKEN",
    "allowed_hosts": "ALLOWED_HOSTS",
}


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if part != "limits"]
        field = loc[0] if loc else "config"
        if field in ("retention_s", "writer_idle_timeout_s"):
            field = field.removesuffix("_s")
        where = sources.get(field, field)
        message = str(error["msg"]).removeprefix("Value error, ")
        if field == "db":  # the message names the URL, without its password
            lines.append(f"{where}: {message}")
            continue
        lines.append(f"{where}: {message} (got {error.get('input')!r})")
    return "invalid server configuration: " + "; ".join(lines)
