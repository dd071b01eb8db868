"""The one translation from domain objects to wire messages.

:func:`step_record` turns an :class:`~inversion_monitor.metrics.stats.InversionStats`
(or a plain mapping, validated by :class:`StatsMapping`), the step's training
health (:data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`: loss,
grad_norm, learning_rate and the RL signals) and the optional extras into a
``StepRecord``. A record may carry health values only (``stats=None``).
Non-finite inversion statistics travel as unset optional fields; non-finite
health values travel as themselves (NaN, +-inf) and are named in
``nonfinite_fields``, so a diverged run is never invisible. The record's
``sequence`` is left at 0: the client numbers records when it first sends them
(see :mod:`inversion_monitor.telemetry.client`).

>>> from inversion_monitor.metrics.stats import InversionStats
>>> stats = stats_from_mapping(
...     {"spearman": -0.6, "pearson": -0.5, "n": 64, "entropy_mean": 1.2, "score_mean": 3.4}
... )
>>> record = step_record(run_id="r1", rank=0, step=10, wall_time=1.0, stats=stats, loss=2.5)
>>> record.inversion.spearman.value, record.inversion.n, record.loss
(-0.6, 64, 2.5)
>>> record.inversion.spearman.HasField("ci_low")  # NaN interval -> unset
False
>>> health = step_record(run_id="r1", rank=0, step=11, wall_time=1.0, stats=None,
...                      health={"loss": float("nan"), "grad_norm": 3.0})
>>> health.HasField("inversion"), health.loss, list(health.nonfinite_fields)
(False, nan, ['loss'])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from inversion_monitor.metrics.stats import InversionStats
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import HEALTH_FIELDS, PROBE_PRECISIONS, one_of
from inversion_monitor.rl.signals import RLStats

_NAN = math.nan
_REQUIRED = ("spearman", "pearson", "n", "entropy_mean", "score_mean")
_HEALTH = frozenset(HEALTH_FIELDS)


class StatsMapping(BaseModel):
    """The inversion statistics of a plain mapping, in place of an ``InversionStats``.

    ``spearman``, ``pearson``, ``n``, ``entropy_mean`` and ``score_mean`` are
    required; every other field of ``InversionStats`` is optional (NaN or
    unset when absent). Unknown keys are an error, so a typo never loses a
    value silently. Health keys (:data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`)
    are split off first by :func:`split_stats`.

    >>> StatsMapping.model_validate(
    ...     {"spearman": -0.6, "pearson": -0.5, "n": 64, "entropy_mean": 1.2, "score_mean": 3.4}
    ... ).n
    64
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spearman: float
    pearson: float
    n: NonNegativeInt
    entropy_mean: float
    score_mean: float
    method: Literal["spearman", "pearson"] = "spearman"
    spearman_ci: tuple[float, float] = (_NAN, _NAN)
    pearson_ci: tuple[float, float] = (_NAN, _NAN)
    confidence: float = _NAN
    insufficient: bool = False
    reason: str | None = None
    entropy_p10: float = _NAN
    entropy_p50: float = _NAN
    entropy_p90: float = _NAN
    score_p50: float = _NAN
    score_p90: float = _NAN
    spearman_per_token_type: float | None = None
    n_token_types: NonNegativeInt | None = None
    extra: dict[str, float] = {}


def split_stats(mapping: Mapping[str, Any]) -> tuple[StatsMapping | None, dict[str, float]]:
    """A mapping's inversion statistics (None when it has none) and its health values.

    Health keys are optional, each a number or None (left out); the inversion
    keys are optional as a group: none of them, or at least the required
    five. Raises ``ValueError`` naming the field and the fix.

    >>> split_stats({"loss": 2.0, "grad_norm": None})
    (None, {'loss': 2.0})
    >>> split_stats({"loss": 2.0, "spearman": -0.5})
    Traceback (most recent call last):
    ...
    ValueError: stats['pearson'] is missing; stats['n'] is missing; stats['entropy_mean'] is
    missing; stats['score_mean'] is missing. Pass an InversionStats, or a mapping with at least
    spearman, pearson, n, entropy_mean and score_mean (numbers; n a non-negative int), or only
    health keys (loss, grad_norm, ...).
    """
    health = health_values(mapping)
    rest = {key: value for key, value in mapping.items() if key not in _HEALTH}
    if not rest:
        return None, health
    try:
        return StatsMapping.model_validate(rest), health
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from None


def health_values(mapping: Mapping[str, Any], *, strict: bool = False) -> dict[str, float]:
    """The health keys of ``mapping`` as floats (None values left out; NaN and inf kept).

    ``strict``: every key must be a health key. Raises ``ValueError`` naming the
    key whose value is not a number.

    >>> health_values({"loss": 1, "kl": float("inf"), "spearman": 0.1})
    {'loss': 1.0, 'kl': inf}
    """
    found: dict[str, float] = {}
    for key, value in mapping.items():
        if key not in _HEALTH:
            if strict:
                raise ValueError(
                    f"health[{key!r}] is not a health field (known: {', '.join(HEALTH_FIELDS)})"
                )
            continue
        if value is None:
            continue
        if isinstance(value, bool | str | bytes):
            raise ValueError(
                f"stats[{key!r}] = {value!r} is not a number: pass a float (or leave the key out)"
            )
        try:
            found[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"stats[{key!r}] = {value!r} is not a number: pass a float (or leave the key out)"
            ) from None
    return found


def validate_stats(mapping: Mapping[str, Any]) -> StatsMapping:
    """Validate a stats mapping that carries inversion statistics (health keys allowed).

    Raises ``ValueError`` naming the field and the fix. The result has the
    attributes of ``InversionStats`` that :func:`step_record` reads, so it can
    be translated without building one.
    """
    checked, _ = split_stats(mapping)
    if checked is not None:
        return checked
    try:
        return StatsMapping.model_validate({})  # raises: the required keys are missing
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from None


def stats_from_mapping(mapping: Mapping[str, Any]) -> InversionStats:
    """Validate a plain mapping and build the ``InversionStats`` it describes.

    Health keys are ignored. Raises ``ValueError`` naming the missing or bad
    field and the fix.

    >>> stats_from_mapping({"spearman": -0.6, "pearson": -0.5, "n": 64, "entropy_mean": 1.2})
    Traceback (most recent call last):
    ...
    ValueError: stats['score_mean'] is missing. Pass an InversionStats, or a mapping with at
    least spearman, pearson, n, entropy_mean and score_mean (numbers; n a non-negative int), or
    only health keys (loss, grad_norm, ...).
    """
    return InversionStats(**validate_stats(mapping).__dict__)


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = "".join(f"[{part!r}]" for part in error["loc"])
        if error["type"] == "missing":
            problems.append(f"stats{where} is missing")
        elif error["type"] == "extra_forbidden":
            known = ", ".join([*StatsMapping.model_fields, *HEALTH_FIELDS])
            problems.append(f"stats{where} is not a known field (known: {known})")
        else:
            problems.append(f"stats{where} = {error['input']!r} is invalid: {error['msg']}")
    return (
        "; ".join(problems)
        + ". Pass an InversionStats, or a mapping with at least "
        + ", ".join(_REQUIRED[:-1])
        + f" and {_REQUIRED[-1]} (numbers; n a non-negative int), or only health keys ("
        + ", ".join(HEALTH_FIELDS)
        + ")."
    )


def _finite(value: float | None) -> float | None:
    """``value`` as a float, or None when it is None or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _set(message: Any, name: str, value: float | None) -> None:
    finite = _finite(value)
    if finite is not None:
        setattr(message, name, finite)


def _check_number(name: str, value: Any) -> None:
    if value is None:
        return
    try:
        float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}={value!r} ({type(value).__name__}) is not a number: pass a float or None"
        ) from None


def step_record(
    *,
    run_id: str,
    rank: int,
    step: int,
    wall_time: float,
    stats: InversionStats | StatsMapping | None,
    loss: float | None = None,
    learning_rate: float | None = None,
    entropy_covariance: float | None = None,
    components: Iterable[Mapping[str, Any]] | None = None,
    samples: Iterable[tuple[float, float, int]] | None = None,
    probe_seconds: float | None = None,
    rl: RLStats | None = None,
    health: Mapping[str, float | None] | None = None,
    probe_precision: str | None = None,
) -> monitor_pb2.StepRecord:
    """Build the ``StepRecord`` of one step (``sequence`` left at 0).

    ``stats`` is an ``InversionStats``, a validated :class:`StatsMapping`, or
    None for a health-only record (no ``inversion``, ``entropy``, ``score``).

    ``components`` are mappings with ``layer`` (int), ``projection``
    (``"q"``, ``"k"``, ``"v"`` or ``"o"``) and optional ``spearman`` and
    ``score_mean``; ``samples`` are ``(entropy, score, token_id)`` triples.
    ``health`` maps names of :data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`
    to numbers (None: not known); ``loss``, ``learning_rate`` and
    ``entropy_covariance`` given as arguments win over it. ``rl`` fills the RL
    fields (reward, policy entropy, advantage, covariance) where neither
    gives them; its NaN means "not measured" and is left unset.
    ``probe_precision`` is one of
    :data:`~inversion_monitor.proto.vocabulary.PROBE_PRECISIONS` (what the
    probe's forward computed in). Non-finite inversion statistics are left
    unset; non-finite health values are sent and named in
    ``nonfinite_fields``. Raises
    ``TypeError``/``ValueError`` naming the bad argument.

    >>> from inversion_monitor.metrics.stats import InversionStats
    >>> s = InversionStats.insufficient_sample(n=2, reason="n < 4")
    >>> r = step_record(
    ...     run_id="r", rank=1, step=3, wall_time=0.0, stats=s,
    ...     components=[{"layer": 0, "projection": "q", "spearman": -0.5}],
    ...     samples=[(1.5, 0.25, 7)],
    ... )
    >>> r.inversion.insufficient, r.inversion.insufficient_reason, r.components[0].layer
    (True, 'n < 4', 0)
    >>> r.inversion.spearman.HasField("value"), r.samples[0].token_id
    (False, 7)
    """
    for name, value in (
        ("loss", loss),
        ("learning_rate", learning_rate),
        ("entropy_covariance", entropy_covariance),
        ("probe_seconds", probe_seconds),
    ):
        _check_number(name, value)
    record = monitor_pb2.StepRecord(run_id=run_id, rank=rank, step=int(step), wall_time=wall_time)
    if stats is not None:
        _add_stats(record, stats)
    _set(record, "probe_seconds", probe_seconds)
    if probe_precision is not None:
        if probe_precision not in PROBE_PRECISIONS:
            raise ValueError(
                f"probe_precision is {probe_precision!r}; expected one of "
                f"{one_of(PROBE_PRECISIONS)}"
            )
        record.probe_precision = probe_precision
    values: dict[str, float | None] = {}
    if rl is not None:
        values.update(_rl_health(rl, record))
    if health:
        for name, value in health.items():
            if name not in _HEALTH:
                raise ValueError(
                    f"health[{name!r}] is not a health field (known: {', '.join(HEALTH_FIELDS)})"
                )
            if value is not None:
                values[name] = value
    for name, value in (
        ("loss", loss),
        ("learning_rate", learning_rate),
        ("entropy_covariance", entropy_covariance),
    ):
        if value is not None:
            values[name] = value
    nonfinite = record.nonfinite_fields
    for name in HEALTH_FIELDS:  # the contract's order, so records compare equal
        value = values.get(name)
        if value is None:
            continue
        number = float(value)
        setattr(record, name, number)
        if not math.isfinite(number):
            nonfinite.append(name)
    if components is not None:
        _add_components(record, components)
    if samples is not None:
        _add_samples(record, samples)
    return record


def _add_stats(record: monitor_pb2.StepRecord, stats: InversionStats | StatsMapping) -> None:
    inversion = record.inversion
    inversion.n = int(stats.n)
    inversion.insufficient = bool(stats.insufficient)
    if stats.reason:
        inversion.insufficient_reason = stats.reason
    confidence = _finite(stats.confidence)
    if confidence is not None:
        inversion.confidence = confidence
    for correlation, value, ci in (
        (inversion.spearman, stats.spearman, stats.spearman_ci),
        (inversion.pearson, stats.pearson, stats.pearson_ci),
    ):
        _set(correlation, "value", value)
        _set(correlation, "ci_low", ci[0])
        _set(correlation, "ci_high", ci[1])
    entropy = record.entropy
    _set(entropy, "mean", stats.entropy_mean)
    _set(entropy, "p10", stats.entropy_p10)
    _set(entropy, "p50", stats.entropy_p50)
    _set(entropy, "p90", stats.entropy_p90)
    score = record.score
    _set(score, "mean", stats.score_mean)
    _set(score, "p50", stats.score_p50)
    _set(score, "p90", stats.score_p90)
    _set(record, "spearman_per_token_type", stats.spearman_per_token_type)


def _rl_health(rl: RLStats, record: monitor_pb2.StepRecord) -> dict[str, float]:
    """The health values of ``rl`` (NaN: not measured, left out); fills the summaries."""
    if not isinstance(rl, RLStats):
        raise TypeError(f"rl must be an RLStats, got {type(rl).__name__}")
    for summary, prefix in (
        (record.policy_entropy, "policy_entropy"),
        (record.advantage, "advantage"),
    ):
        _set(summary, "mean", getattr(rl, f"{prefix}_mean"))
        for q in ("p10", "p50", "p90"):
            _set(summary, q, getattr(rl, f"{prefix}_{q}"))
    return rl.health_values()


def _add_components(
    record: monitor_pb2.StepRecord, components: Iterable[Mapping[str, Any]]
) -> None:
    for i, item in enumerate(components):
        try:
            component = record.components.add(
                layer=int(item["layer"]), projection=str(item["projection"])
            )
            _set(component, "spearman", item.get("spearman"))
            _set(component, "score_mean", item.get("score_mean"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"components[{i}] = {item!r} is invalid ({exc!r}): pass mappings with "
                "'layer' (int >= 0), 'projection' ('q', 'k', 'v' or 'o') and optional "
                "'spearman' and 'score_mean' (floats)"
            ) from None


def _add_samples(
    record: monitor_pb2.StepRecord, samples: Iterable[tuple[float, float, int]]
) -> None:
    for i, item in enumerate(samples):
        try:
            entropy, score, token_id = item
            record.samples.add(entropy=float(entropy), score=float(score), token_id=int(token_id))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"samples[{i}] = {item!r} is invalid ({exc!r}): pass (entropy, score, token_id) "
                "triples of float, float, int >= 0"
            ) from None
