"""Shared fixtures: tiny causal LMs, a local tokenizer and a reasoning corpus."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inversion_monitor.server import MonitorServer
from inversion_monitor.toy.corpus import (
    ArithmeticProblem,
    arithmetic_problems,
    reasoning_corpus,
)
from inversion_monitor.toy.models import ARCHITECTURES, Architecture, tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.deepspeed_ops import EXTENSIONS_DIR, build_shm_op
from tests.postgres_support import PostgresCluster, TestDatabase
from tests.server_support import running


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    """A character-level ``PreTrainedTokenizerFast`` (pad 0, bos 1, eos 2)."""
    return char_tokenizer()


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """256 multi-step arithmetic problems with worked steps (fixed seed)."""
    return reasoning_corpus(256, seed=1234)


@pytest.fixture(scope="session")
def problems() -> list[ArithmeticProblem]:
    """64 prompt/completion/answer triples for reward-based tests."""
    return arithmetic_problems(64, seed=4321)


@pytest.fixture
def make_model() -> Callable[..., object]:
    """Factory: ``make_model("gpt2", num_layers=3, seed=1)`` -> a fresh tiny model."""
    return tiny_causal_lm


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> Architecture:
    """Each supported toy architecture in turn: llama, qwen2, gpt2, gpt_neox."""
    value: Architecture = request.param
    return value


@pytest.fixture
def tiny_model(arch: Architecture):  # type: ignore[no-untyped-def]
    """A fresh tiny model of each architecture (3 layers, so first/middle/last differ)."""
    return tiny_causal_lm(arch, num_layers=3, seed=0)


@pytest.fixture(scope="module")
def dist_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitorServer]:
    """A real server on loopback shared by one test module's distributed jobs."""
    with running(tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture(scope="session")
def deepspeed_ops() -> Iterator[None]:
    """DeepSpeed's CPU shared-memory op built once (tests/deepspeed_ops.py), and its folder
    in ``TORCH_EXTENSIONS_DIR`` for the ranks this process spawns: request it before
    starting DeepSpeed ranks."""
    try:
        build_shm_op()
    except RuntimeError as error:
        pytest.fail(str(error))
    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS_DIR)
    yield
    if previous is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = previous


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL 15 cluster for the session (started on first use)."""
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> TestDatabase:
    """Each store backend in turn: a SQLite file in ``tmp_path``, a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return TestDatabase("sqlite", tmp_path / "monitor.db")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    name = cluster.create_database()
    return TestDatabase("postgresql", cluster.url(name), cluster, name)
