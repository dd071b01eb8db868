"""Run every docstring example in the package as a test."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import inversion_monitor

MODULES = ["inversion_monitor"] + [
    m.name
    for m in pkgutil.walk_packages(inversion_monitor.__path__, "inversion_monitor.")
    if not m.name.endswith(("_pb2", "_pb2_grpc"))
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
