"""The root package's lazy public API: the list, the names, and no eager torch import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import inversion_monitor


def test_all_is_version_then_the_sorted_lazy_exports() -> None:
    assert inversion_monitor.__all__ == ["__version__", *sorted(inversion_monitor._LAZY_EXPORTS)]


@pytest.mark.parametrize("name", sorted(inversion_monitor._LAZY_EXPORTS))
def test_every_lazy_name_resolves_to_its_module(name: str) -> None:
    value = getattr(inversion_monitor, name)
    module = inversion_monitor._LAZY_EXPORTS[name]
    assert value.__name__ == name
    assert value.__module__ in {f"inversion_monitor{module}", "inversion_monitor._checks"}
    assert name in dir(inversion_monitor)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        _ = inversion_monitor.not_a_name


def test_importing_the_root_does_not_import_torch() -> None:
    code = (
        "import sys, inversion_monitor\n"
        "assert 'torch' not in sys.modules, 'inversion_monitor imported torch eagerly'\n"
        "inversion_monitor.spearman\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
