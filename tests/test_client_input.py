"""Caller errors raise clearly; the translation to the wire is exact; TLS works."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator
from concurrent import futures
from dataclasses import fields
from pathlib import Path

import grpc
import pytest

from inversion_monitor import MonitorClient
from inversion_monitor.metrics.stats import InversionStats
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.proto.vocabulary import HEALTH_FIELDS
from inversion_monitor.rl.signals import RL_STATS_KEYS
from inversion_monitor.telemetry.wire import (
    StatsMapping,
    split_stats,
    stats_from_mapping,
    step_record,
    validate_stats,
)
from tests.scripted_server import FAST, ScriptedServicer, stats

NAN = math.nan


@pytest.fixture(scope="module")
def client() -> Iterator[MonitorClient]:
    # never reaches a server: validation happens before anything is queued
    c = MonitorClient("127.0.0.1:9", "input", run_id="input", **FAST)
    yield c
    c.close(timeout_s=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": None}, r"stats\['n'\] is missing"),
        ({"spearman": None}, r"stats\['spearman'\] is missing"),
        ({"score_mean": None}, r"stats\['score_mean'\] is missing"),
        ({"spearman": "strong"}, r"stats\['spearman'\] = 'strong' is invalid"),
        ({"n": -1}, r"stats\['n'\] = -1 is invalid: .*greater than or equal to 0"),
        ({"n": 2.5}, r"stats\['n'\] = 2.5 is invalid"),
        ({"spearmann": 0.1}, r"stats\['spearmann'\] is not a known field \(known: spearman,"),
        ({"spearman_ci": (0.1,)}, r"stats\['spearman_ci'\]"),
    ],
)
def test_bad_mapping_names_the_field_and_the_fix(
    client: MonitorClient, change: dict[str, object], message: str
) -> None:
    mapping: dict[str, object] = dict(stats(0))
    for key, value in change.items():
        if value is None:
            del mapping[key]
        else:
            mapping[key] = value
    with pytest.raises(ValueError, match=message) as info:
        client.log(0, mapping)
    assert "Pass an InversionStats, or a mapping with at least spearman" in str(info.value)
    assert client.report().logged == 0  # nothing was queued


def test_bad_arguments_of_log_raise_with_the_name(client: MonitorClient) -> None:
    with pytest.raises(TypeError, match="a mapping or None, got list"):
        client.log(0, [0.1, 0.2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"loss='high' \(str\) is not a number"):
        client.log(0, stats(0), loss="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"components\[1\] = .* is invalid"):
        client.log(0, stats(0), components=[{"layer": 0, "projection": "q"}, {"layer": 1}])
    with pytest.raises(ValueError, match=r"samples\[0\] = \(1.0, 2.0\) is invalid"):
        client.log(0, stats(0), samples=[(1.0, 2.0)])  # type: ignore[list-item]
    assert client.report().logged == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run_id": "has space"}, "run_id='has space' is invalid"),
        ({"run_id": "x" * 65}, "is invalid: use 1-64 characters"),
        ({"rank": 2, "world_size": 2}, r"rank=2 must be in \[0, world_size=2\)"),
        ({"world_size": 0}, "world_size=0 must be >= 1"),
        ({"batch_size": 0}, r"batch_size: Input should be greater than or equal to 1 \(got 0\)"),
        ({"max_buffer": 10, "batch_size": 20}, "max_buffer=10 must be >= batch_size=20"),
        ({"flush_interval_s": 0}, r"flush_interval_s: Input should be greater than 0 \(got 0\)"),
        ({"rpc_timeout_s": float("nan")}, r"rpc_timeout_s: .*finite number \(got nan\)"),
        ({"config": {"f": {1, 2}}}, None),  # sets serialise with str(): accepted
        ({"tls": "/no/such/ca.pem"}, "cannot read the root certificates"),
    ],
)
def test_constructor_validates(kwargs: dict[str, object], message: str | None) -> None:
    if message is None:
        MonitorClient("127.0.0.1:9", "ok", **kwargs).close(timeout_s=0)  # type: ignore[arg-type]
        return
    with pytest.raises(ValueError, match=message):
        MonitorClient("127.0.0.1:9", "bad", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", ["", "http://host:1", "https://host:1"])
def test_endpoint_must_be_a_grpc_target(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        MonitorClient(endpoint, "bad")


def test_labels_must_be_strings() -> None:
    with pytest.raises(TypeError, match="labels map strings to strings"):
        MonitorClient("127.0.0.1:9", "bad", labels={"gpu": 8})  # type: ignore[dict-item]


# ---------------------------------------------------------------- translation


def _full_stats(**overrides: object) -> InversionStats:
    values: dict[str, object] = {
        "method": "pearson",
        "n": 128,
        "spearman": -0.61,
        "pearson": -0.52,
        "spearman_ci": (-0.7, -0.5),
        "pearson_ci": (-0.6, -0.4),
        "confidence": 0.95,
        "insufficient": False,
        "reason": None,
        "entropy_mean": 1.5,
        "entropy_p10": 0.1,
        "entropy_p50": 1.2,
        "entropy_p90": 3.3,
        "score_mean": 4.5,
        "score_p50": 4.0,
        "score_p90": 9.0,
        "spearman_per_token_type": -0.3,
        "n_token_types": 40,
    }
    values.update(overrides)
    return InversionStats(**values)  # type: ignore[arg-type]


def _reference(s: InversionStats) -> dict[str, object]:
    """Field by field, what the record must hold (None: unset)."""

    def opt(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else x

    return {
        "inversion.n": s.n,
        "inversion.insufficient": s.insufficient,
        "inversion.insufficient_reason": s.reason or "",
        "inversion.confidence": opt(s.confidence) or 0.0,
        "inversion.spearman.value": opt(s.spearman),
        "inversion.spearman.ci_low": opt(s.spearman_ci[0]),
        "inversion.spearman.ci_high": opt(s.spearman_ci[1]),
        "inversion.pearson.value": opt(s.pearson),
        "inversion.pearson.ci_low": opt(s.pearson_ci[0]),
        "inversion.pearson.ci_high": opt(s.pearson_ci[1]),
        "entropy.mean": opt(s.entropy_mean),
        "entropy.p10": opt(s.entropy_p10),
        "entropy.p50": opt(s.entropy_p50),
        "entropy.p90": opt(s.entropy_p90),
        "score.mean": opt(s.score_mean),
        "score.p10": None,
        "score.p50": opt(s.score_p50),
        "score.p90": opt(s.score_p90),
        "spearman_per_token_type": opt(s.spearman_per_token_type),
    }


def _read(record: monitor_pb2.StepRecord, path: str) -> object:
    *parents, name = path.split(".")
    message = record
    for parent in parents:
        message = getattr(message, parent)
    descriptor = message.DESCRIPTOR.fields_by_name[name]
    if descriptor.has_presence and not message.HasField(name):
        return None
    return getattr(message, name)


@pytest.mark.parametrize(
    "s",
    [
        _full_stats(),
        _full_stats(spearman=NAN, pearson_ci=(NAN, 0.2), confidence=NAN, entropy_p10=math.inf),
        _full_stats(spearman_per_token_type=None, insufficient=True, reason="constant entropy"),
        InversionStats.insufficient_sample(n=3, reason="n < 4"),
    ],
)
def test_translation_matches_a_field_by_field_reference(s: InversionStats) -> None:
    record = step_record(
        run_id="r",
        rank=2,
        step=7,
        wall_time=12.5,
        stats=s,
        loss=NAN,
        learning_rate=3e-4,
        entropy_covariance=-0.01,
        probe_seconds=0.25,
        components=[{"layer": 3, "projection": "o", "spearman": NAN, "score_mean": 1.0}],
        samples=[(0.5, 1.5, 42)],
    )
    for path, expected in _reference(s).items():
        got = _read(record, path)
        assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, (
            path,
            got,
            expected,
        )
    assert (record.run_id, record.rank, record.sequence, record.step) == ("r", 2, 0, 7)
    assert record.wall_time == 12.5
    assert math.isnan(record.loss)  # a health value: sent as NaN and named
    assert list(record.nonfinite_fields) == ["loss"]
    assert (record.learning_rate, record.entropy_covariance, record.probe_seconds) == (
        3e-4,
        -0.01,
        0.25,
    )
    component = record.components[0]
    assert (component.layer, component.projection, component.score_mean) == (3, "o", 1.0)
    assert not component.HasField("spearman")
    assert (record.samples[0].entropy, record.samples[0].score, record.samples[0].token_id) == (
        0.5,
        1.5,
        42,
    )


def test_every_stats_field_is_accepted_by_the_mapping_model() -> None:
    names = {f.name for f in fields(InversionStats)}
    # the health keys (RL signals included) are split off before the model sees them
    assert names == set(StatsMapping.model_fields)
    assert set(RL_STATS_KEYS) <= set(HEALTH_FIELDS)
    s = _full_stats()
    assert stats_from_mapping(s.to_dict()) == s


def test_minimal_mapping_equals_the_dataclass_with_nan_defaults() -> None:
    minimal = step_record(
        run_id="r", rank=0, step=1, wall_time=0.0, stats=stats_from_mapping(stats(3))
    )
    explicit = InversionStats(
        method="spearman",
        n=64,
        spearman=stats(3)["spearman"],
        pearson=-0.4,
        spearman_ci=(NAN, NAN),
        pearson_ci=(NAN, NAN),
        confidence=NAN,
        insufficient=False,
        reason=None,
        entropy_mean=4.0,
        entropy_p10=NAN,
        entropy_p50=NAN,
        entropy_p90=NAN,
        score_mean=2.0,
        score_p50=NAN,
        score_p90=NAN,
    )
    assert minimal == step_record(run_id="r", rank=0, step=1, wall_time=0.0, stats=explicit)
    validated = validate_stats(stats(3))  # what log() translates, without an InversionStats
    assert minimal == step_record(run_id="r", rank=0, step=1, wall_time=0.0, stats=validated)
    assert minimal.inversion.confidence == 0.0  # NaN confidence: the proto3 default
    assert not minimal.entropy.HasField("p50")


# ---------------------------------------------------------------- health records


def test_a_mapping_of_health_keys_alone_is_a_health_record() -> None:
    checked, health = split_stats({"loss": 2.0, "grad_norm": math.inf, "kl": None})
    assert checked is None and health == {"loss": 2.0, "grad_norm": math.inf}
    record = step_record(run_id="r", rank=0, step=4, wall_time=1.0, stats=None, health=health)
    assert not record.HasField("inversion") and not record.HasField("entropy")
    assert (record.loss, record.grad_norm) == (2.0, math.inf)
    assert list(record.nonfinite_fields) == ["grad_norm"]
    assert not record.HasField("kl")


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"loss": "high"}, r"stats\['loss'\] = 'high' is not a number"),
        ({"grad_norm": True}, r"stats\['grad_norm'\] = True is not a number"),
        ({"loss": 1.0, "spearman": -0.5}, r"stats\['pearson'\] is missing"),
        ({"loss": 1.0, "gradnorm": 2.0}, r"stats\['gradnorm'\] is not a known field"),
    ],
)
def test_bad_health_mapping_names_the_field(
    client: MonitorClient, mapping: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        client.log(1, mapping)


def test_every_health_value_given_twice_is_an_error(client: MonitorClient) -> None:
    with pytest.raises(ValueError, match="loss given twice"):
        client.log(1, {"loss": 1.0}, loss=2.0)
    with pytest.raises(ValueError, match="kl given twice"):
        client.log(1, {"kl": 1.0}, health={"kl": 2.0})
    with pytest.raises(ValueError, match="not a health field"):
        client.log(1, None, health={"spearman": 2.0})


def test_non_finite_health_values_are_sent_and_named_in_the_contract_order() -> None:
    health = {name: math.nan for name in reversed(HEALTH_FIELDS)}
    record = step_record(run_id="r", rank=0, step=1, wall_time=1.0, stats=None, health=health)
    assert list(record.nonfinite_fields) == list(HEALTH_FIELDS)
    assert all(math.isnan(getattr(record, name)) for name in HEALTH_FIELDS)


# ---------------------------------------------------------------- TLS


def test_tls_with_a_root_certificate_file(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        client = MonitorClient(f"localhost:{port}", "tls", run_id="tls", tls=cert, **FAST)
        client.log(0, stats(0))
        assert client.flush(timeout_s=20)
        client.close(timeout_s=5)
        assert servicer.sequences("tls") == [1]
    finally:
        server.stop(grace=None).wait(5)
