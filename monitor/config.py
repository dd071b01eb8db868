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
>>> MonitorConfig(tokens_per_probe=2)
Traceback (most recent call last):
...
ValueError: invalid MonitorConfig: tokens_per_probe: Input should be greater than or equal to 4...
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
Projection = Literal["q", "k", "v", "o"]


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
    endpoint: str | None = Field(None, description="gRPC server 'host:port'; None = local only")
    run_name: str | None = Field(None, description="human run name; default from the trainer")
    run_id: str | None = Field(None, description="reuse to resume a run; default a new id")
    project: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    token: str | None = Field(None, description="bearer token for the server", repr=False)
    tls: bool | str = Field(False, description="False, True (system roots) or a CA file path")
    spool_dir: str | None = Field(None, description="spill records here when the server is away")
    jsonl_path: str | None = Field(None, description="also append every record to this file")
    log_to_trainer: bool = Field(True, description="add inversion/... keys to the trainer logs")

    # what is measured
    layers: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    projections: tuple[Projection, ...] = ("q", "k", "v", "o")
    norm: Literal["nuclear", "frobenius", "l1"] = "nuclear"
    method: Literal["spearman", "pearson"] = "spearman"
    tokens_per_probe: int = Field(64, ge=4, le=65_536)
    sequences_per_probe: int = Field(4, ge=1)
    per_token_type: bool = False
    token_samples: int = Field(0, ge=0, le=4096, description="raw (entropy, score) pairs sent")
    per_component_stats: bool = True
    chunk_tokens: int = Field(8192, ge=1)
    seed: int = 0

    # when it is measured
    every_n_steps: int | None = Field(None, ge=1, description="fixed schedule; None = budget")
    overhead_budget: float = Field(0.03, gt=0.0, lt=1.0, description="fraction of wall time")
    first_step: int = Field(1, ge=0, description="no probe before this optimizer step")

    # failure policy
    on_error: Literal["disable", "continue"] = "disable"
    disabled: bool = False
    agreement_timeout_s: float = Field(
        300.0, gt=0.0, description="distributed: how long a rank waits for the others' vote"
    )

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _FLAGS:
            return _FLAGS[value.strip().lower()]
        return value

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

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ValueError(explain_validation_error("MonitorConfig", exc)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MonitorConfig:
        """Defaults, then ``INVERSION_MONITOR_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            values[name] = _parse_env(raw, list_like=_is_list_like(info.annotation))
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> MonitorConfig:
        """A copy with ``overrides`` applied and validated."""
        return type(self)(**{**self.model_dump(), **overrides})

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
