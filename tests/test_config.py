"""MonitorConfig: validation messages, environment parsing, precedence, secrets."""

from __future__ import annotations

import pytest

from inversion_monitor.config import MonitorConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens_per_probe": 0}, "tokens_per_probe: Input should be greater than or equal to 4"),
        ({"tokens_per_probe": -1}, "tokens_per_probe"),
        ({"tokens_per_probe": "many"}, "tokens_per_probe: Input should be a valid integer"),
        ({"sequences_per_probe": 0}, "sequences_per_probe"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"overhead_budget": 0}, "overhead_budget: Input should be greater than 0"),
        ({"overhead_budget": 1}, "overhead_budget: Input should be less than 1"),
        ({"projections": ["q", "q"]}, "projections: Value error, contains duplicates"),
        ({"projections": []}, "projections: Value error, must name at least one"),
        ({"projections": ["x"]}, "projections.0: Input should be 'q', 'k', 'v' or 'o'"),
        ({"layers": []}, "layers: List should have at least 1 item"),
        ({"layers": [1, 1]}, "layers: Value error, contains duplicates"),
        ({"norm": "spectral"}, "norm: Input should be 'nuclear', 'frobenius' or 'l1'"),
        ({"on_error": "explode"}, "on_error"),
        ({"endpont": "x"}, "endpont: Extra inputs are not permitted"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match="invalid MonitorConfig") as exc:
        MonitorConfig(**kwargs)
    assert message in str(exc.value)


def test_environment_parsing_and_precedence():
    env = {
        "INVERSION_MONITOR_ENDPOINT": "localhost:1",
        "INVERSION_MONITOR_LAYERS": "[0, -1]",
        "INVERSION_MONITOR_PROJECTIONS": "q, o",
        "INVERSION_MONITOR_LABELS": '{"team": "rl"}',
        "INVERSION_MONITOR_EVERY_N_STEPS": "7",
        "INVERSION_MONITOR_PER_TOKEN_TYPE": "true",
        "INVERSION_MONITOR_TLS": "0",
        "INVERSION_MONITOR_OVERHEAD_BUDGET": "",
    }
    config = MonitorConfig.from_env(env, every_n_steps=3)
    assert config.endpoint == "localhost:1"
    assert config.layers == [0, -1] and config.projections == ("q", "o")
    assert config.labels == {"team": "rl"} and config.per_token_type is True
    assert config.every_n_steps == 3  # argument beats environment
    assert config.tls is False and config.overhead_budget == 0.03


def test_bad_environment_value_names_the_field():
    with pytest.raises(ValueError, match="tokens_per_probe"):
        MonitorConfig.from_env({"INVERSION_MONITOR_TOKENS_PER_PROBE": "lots"})


def test_token_is_neither_shown_nor_exported():
    config = MonitorConfig(token="s3cret")
    assert "s3cret" not in repr(config)
    assert "token" not in config.public_dict()
    assert config.with_overrides(every_n_steps=2).token == "s3cret"


def test_overrides_typed_dict_lists_every_field_with_its_type():
    """The callbacks' typed keyword arguments stay equal to the config's fields."""
    import typing

    from inversion_monitor.config import MonitorOverrides

    hints = typing.get_type_hints(MonitorOverrides)
    fields = MonitorConfig.model_fields
    assert set(hints) == set(fields)
    for name, info in fields.items():
        if name == "projections":  # a list is accepted and coerced to the tuple
            continue
        assert hints[name] == info.annotation, name


def test_components_take_defaults_and_bounds_from_the_config():
    from inversion_monitor.config import default, validate_field
    from inversion_monitor.engine.schedule import ProbeSchedule
    from inversion_monitor.probe.sampling import TokenSampler

    schedule = ProbeSchedule()
    assert schedule.overhead_budget == default("overhead_budget") == MonitorConfig().overhead_budget
    assert schedule.first_step == MonitorConfig().first_step
    with pytest.raises(ValueError, match=r"overhead_budget: Input should be less than 1 \(got 2\)"):
        ProbeSchedule(overhead_budget=2)
    with pytest.raises(ValueError, match="every_n_steps: Input should be greater than or equal"):
        ProbeSchedule(every_n_steps=0)
    config = MonitorConfig(tokens_per_probe=8, sequences_per_probe=2, seed=3, every_n_steps=7)
    sampler = TokenSampler.from_config(config, rank=2)
    assert (sampler.max_tokens, sampler.max_sequences, sampler.seed) == (8, 2, 5)
    assert ProbeSchedule.from_config(config).every_n_steps == 7
    with pytest.raises(
        ValueError, match="tokens_per_probe: Input should be greater than or equal to 4"
    ):
        validate_field("tokens_per_probe", 3)


def test_readme_documents_every_field():
    """The README's configuration table names every MonitorConfig field."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Configuration") :]
    table = table[: table.index("\n\n", table.index("| field |"))]
    missing = [name for name in MonitorConfig.model_fields if f"`{name}`" not in table]
    assert missing == []
