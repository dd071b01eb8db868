"""``MonitorConfig``: every setting of the monitor, validated, from code or environment.

Precedence: explicit arguments > ``INVERSION_MONITOR_<FIELD>`` environment
variables > defaults. Lists and mappings in the environment are JSON
(``INVERSION_MONITOR_LAYERS='[0, -1]'``) or comma-separated
(``INVERSION_MONITOR_PROJECTIONS=q,o``); booleans accept 1/0/true/false.

>>> config = MonitorConfig(endpoint="localhost:50051", every_n_steps=10)
>>> config.layers, config.projections, config.tokens_per_probe
([-1], ('q', 'k', 'v', 'o'), 64)
>>> MonitorConfig.from_env({"INVERSION_MONITOR_LAYERS": "0,-1"}, norm="frobenius").layers
[0, -1]
>>> try:
...     MonitorConfig(tokens_per_probe=2)
... except ValueError as exc:  # a MonitorConfigError, with .problems for programs
...     print(exc)
invalid MonitorConfig: tokens_per_probe: Input should be greater than or equal to 4 (got 2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict, Unpack

from inversion_monitor.metrics import MIN_CORRELATION_PAIRS
from inversion_monitor.proto.vocabulary import PROJECTIONS, RUN_KINDS, Projection, RunKind, one_of
from inversion_monitor.telemetry.endpoints import join_endpoints

ENV_PREFIX = "INVERSION_MONITOR_"
_FLAGS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
    "": False,
}
# the fields MonitorClient takes as keyword arguments of the same name
DELIVERY_FIELDS = (
    "max_buffer",
    "batch_size",
    "flush_interval_s",
    "rpc_timeout_s",
    "backoff_initial_s",
    "backoff_max_s",
    "close_timeout_s",
)


class MonitorConfigError(ValueError):
    """An invalid :class:`MonitorConfig`; ``problems`` holds ``(field, message, value)``.

    >>> try:
    ...     MonitorConfig(norm="spectral")
    ... except MonitorConfigError as exc:
    ...     exc.problems[0][:2]
    ('norm', "Input should be 'nuclear', 'frobenius' or 'l1'")
    """

    def __init__(self, message: str, problems: list[tuple[str, str, Any]]) -> None:
        super().__init__(message)
        self.problems = problems


def explain_validation_error(model: str, exc: ValidationError) -> str:
    """One line per problem: ``field: message (got value)``."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(config)"
        got = error.get("input")
        suffix = "" if isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{field}: {error['msg']}{suffix}")
    return f"invalid {model}: " + "; ".join(problems)


class MonitorConfig(BaseModel):
    """Settings of the inversion monitor (see the module docstring for the environment).

    >>> MonitorConfig(layers=[0, -1], projections=["q", "o"]).projections
    ('q', 'o')
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # where records go
    endpoint: str | None = Field(
        None,
        description="gRPC server 'host:port', or replicas 'host1:port1,host2:port2' "
        "(failover); None = local only",
    )
    run_name: str | None = Field(None, description="human run name; default from the trainer")
    run_id: str | None = Field(None, description="reuse to resume a run; default a new id")
    project: str = Field("", description="project the run belongs to")
    labels: dict[str, str] = Field(default_factory=dict, description="free-form run labels")
    token: str | None = Field(None, description="bearer token for the server", repr=False)
    tls: bool | str = Field(False, description="False, True (system roots) or a CA file path")
    spool_dir: str | None = Field(None, description="spill records here when the server is away")
    jsonl_path: str | None = Field(None, description="also append every record to this file")
    log_to_trainer: bool = Field(True, description="add inversion/... keys to the trainer logs")
    kind: RunKind | None = Field(
        None, description=f"{one_of(RUN_KINDS)}; None = detected from the trainer"
    )

    # how records are delivered to the server (MonitorClient)
    max_buffer: int = Field(10_000, ge=1, description="unacknowledged records held in memory")
    batch_size: int = Field(500, ge=1, description="records per Push")
    flush_interval_s: float = Field(
        1.0, gt=0.0, allow_inf_nan=False, description="send (and fsync the spool) this often"
    )
    rpc_timeout_s: float = Field(10.0, gt=0.0, allow_inf_nan=False, description="per call")
    backoff_initial_s: float = Field(0.5, gt=0.0, allow_inf_nan=False, description="first retry")
    backoff_max_s: float = Field(30.0, gt=0.0, allow_inf_nan=False, description="longest retry")
    close_timeout_s: float = Field(
        5.0, ge=0.0, allow_inf_nan=False, description="delivery wait at close and exit"
    )

    # what is measured
    layers: list[int] = Field(
        default_factory=lambda: [-1],
        min_length=1,
        description="decoder blocks to probe, negative from the end",
    )
    projections: tuple[Projection, ...] = Field(
        PROJECTIONS, description=f"attention projections (subset of {one_of(PROJECTIONS)})"
    )
    norm: Literal["nuclear", "frobenius", "l1"] = Field(
        "nuclear", description="matrix norm of d logit / d W"
    )
    method: Literal["spearman", "pearson"] = Field(
        "spearman", description="correlation reported as rho"
    )
    tokens_per_probe: int = Field(
        64, ge=MIN_CORRELATION_PAIRS, le=65_536, description="tokens sampled per probe"
    )
    sequences_per_probe: int = Field(4, ge=1, description="sequences the tokens come from")
    per_token_type: bool = Field(False, description="also the per-unique-token Spearman")
    token_samples: int = Field(0, ge=0, le=4096, description="raw (entropy, score) pairs sent")
    per_component_stats: bool = Field(True, description="statistics per layer and projection")
    chunk_tokens: int = Field(8192, ge=1, description="token budget of one probe forward")
    seed: int = Field(0, ge=0, description="seed of the token sampler (plus the rank)")

    # when it is measured
    every_n_steps: int | None = Field(None, ge=1, description="fixed schedule; None = budget")
    overhead_budget: float = Field(
        0.03, gt=0.0, lt=1.0, description="fraction of wall time probes may take"
    )
    first_step: int = Field(1, ge=0, description="no probe before this optimizer step")

    # failure policy
    on_error: Literal["disable", "continue"] = Field(
        "disable", description="on an internal error: warn once and disable, or continue"
    )
    disabled: bool = Field(False, description="switch the monitor off")
    agreement_timeout_s: float = Field(
        300.0, gt=0.0, description="distributed: how long a rank waits for the others' vote"
    )

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _FLAGS:
            return _FLAGS[value.strip().lower()]
        return value

    @field_validator("endpoint", mode="before")
    @classmethod
    def _endpoint_list(cls, value: Any) -> Any:
        if value is None or not isinstance(value, str | list | tuple):
            return value  # None, or a type error pydantic explains
        if isinstance(value, str) and not value.strip():
            return None  # "": no server, as before lists existed
        return join_endpoints(value)

    @field_validator("projections")
    @classmethod
    def _unique_projections(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one of q, k, v, o")
        if len(set(value)) != len(value):
            raise ValueError(f"contains duplicates: {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"contains duplicates: {value}")
        return value

    @model_validator(mode="after")
    def _buffer_holds_a_batch(self) -> MonitorConfig:
        check_buffer_holds_a_batch(self.max_buffer, self.batch_size)
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = [
                (".".join(str(p) for p in e["loc"]), e["msg"], e.get("input")) for e in exc.errors()
            ]
            message = explain_validation_error("MonitorConfig", exc)
            raise MonitorConfigError(message, problems) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MonitorConfig:
        """Defaults, then ``INVERSION_MONITOR_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        return cls(**{**cls.env_values(environ), **overrides})

    @classmethod
    def env_values(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        """The raw field values the ``INVERSION_MONITOR_*`` variables of ``environ`` set."""
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            values[name] = _parse_env(raw, list_like=_is_list_like(info.annotation))
        return values

    def with_overrides(self, **overrides: Unpack[MonitorOverrides]) -> MonitorConfig:
        """A copy with ``overrides`` applied and validated."""
        return type(self)(**{**self.model_dump(), **overrides})

    def delivery_options(self) -> dict[str, Any]:
        """The delivery keyword arguments of :class:`~inversion_monitor.MonitorClient`.

        >>> MonitorConfig(batch_size=50).delivery_options()["batch_size"]
        50
        """
        return {name: getattr(self, name) for name in DELIVERY_FIELDS}

    def public_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values, without secrets (sent to the server)."""
        return self.model_dump(mode="json", exclude={"token"})


def _is_list_like(annotation: Any) -> bool:
    text = str(annotation)
    return text.startswith(("list", "tuple", "dict")) or "list[" in text or "tuple[" in text


def _parse_env(raw: str, *, list_like: bool) -> Any:
    text = raw.strip()
    if text[:1] in '[{"' or text in ("true", "false", "null"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    if list_like:
        return [part.strip() for part in text.split(",") if part.strip()]
    return raw


class MonitorOverrides(TypedDict, total=False):
    """Keyword arguments the callbacks accept: any :class:`MonitorConfig` field.

    Kept equal to the model's fields by ``tests/test_config.py``, so IDEs and
    type checkers see every knob:

    >>> sorted(MonitorOverrides.__annotations__) == sorted(MonitorConfig.model_fields)
    True
    """

    endpoint: str | None
    run_name: str | None
    run_id: str | None
    project: str
    labels: dict[str, str]
    token: str | None
    tls: bool | str
    spool_dir: str | None
    jsonl_path: str | None
    log_to_trainer: bool
    kind: RunKind | None
    max_buffer: int
    batch_size: int
    flush_interval_s: float
    rpc_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    close_timeout_s: float
    layers: list[int]
    projections: tuple[Projection, ...] | list[Projection]
    norm: Literal["nuclear", "frobenius", "l1"]
    method: Literal["spearman", "pearson"]
    tokens_per_probe: int
    sequences_per_probe: int
    per_token_type: bool
    token_samples: int
    per_component_stats: bool
    chunk_tokens: int
    seed: int
    every_n_steps: int | None
    overhead_budget: float
    first_step: int
    on_error: Literal["disable", "continue"]
    disabled: bool
    agreement_timeout_s: float


def default(name: str) -> Any:
    """The default of :class:`MonitorConfig` field ``name``.

    >>> default("overhead_budget"), default("layers")
    (0.03, [-1])
    """
    return MonitorConfig.model_fields[name].get_default(call_default_factory=True)


def check_buffer_holds_a_batch(max_buffer: int, batch_size: int) -> None:
    """The delivery rule across two fields: a full batch must fit in the buffer."""
    if max_buffer < batch_size:
        raise ValueError(f"max_buffer={max_buffer} must be >= batch_size={batch_size}")


def validate_delivery(**options: Any) -> dict[str, Any]:
    """The delivery settings of :data:`DELIVERY_FIELDS` (defaults where not given), each
    checked against its field.

    >>> validate_delivery(batch_size=10, max_buffer=5)
    Traceback (most recent call last):
    ...
    ValueError: max_buffer=5 must be >= batch_size=10
    """
    unknown = set(options) - set(DELIVERY_FIELDS)
    if unknown:
        raise TypeError(f"not delivery settings: {', '.join(sorted(unknown))}")
    checked = {
        name: validate_field(name, options[name] if name in options else default(name))
        for name in DELIVERY_FIELDS
    }
    check_buffer_holds_a_batch(checked["max_buffer"], checked["batch_size"])
    return checked


def validate_field(name: str, value: Any) -> Any:
    """``value`` checked (and coerced) against field ``name``'s type and bounds.

    The one place a bound lives is the field; components that take a single
    setting (the schedule, the sampler) check it here.

    >>> validate_field("overhead_budget", 2.0)
    Traceback (most recent call last):
    ...
    ValueError: overhead_budget: Input should be less than 1 (got 2.0)
    """
    info = MonitorConfig.model_fields[name]
    annotated: Any = Annotated[(info.annotation, *info.metadata)]  # the field's type and bounds
    adapter: TypeAdapter[Any] = TypeAdapter(annotated)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ValueError(f"{name}: {problem['msg']} (got {value!r})") from None
