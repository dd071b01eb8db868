"""The package installs and imports as one root, from a wheel and in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

import inversion_monitor

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = textwrap.dedent(
    """
    import importlib, pkgutil
    import inversion_monitor
    names = {"inversion_monitor"}
    for name in ("inversion_monitor", "inversion_monitor.callbacks",
                 "inversion_monitor.server", "inversion_monitor.proto"):
        package = importlib.import_module(name)
        names.add(name)
        for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.add(m.name)
    for name in sorted(names):
        importlib.import_module(name)
    print(inversion_monitor.__file__)
    print(",".join(sorted(names)))
    """
)


FOLDERS = {
    "monitor": "inversion_monitor",
    "callbacks": "inversion_monitor.callbacks",
    "server": "inversion_monitor.server",
    "proto": "inversion_monitor.proto",
}


def _source_module_names() -> set[str]:
    """Every module the source folders define, named as installed."""
    names = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if not (path.parent / "__init__.py").exists():
                continue  # package data, e.g. callbacks/_bootstrap/sitecustomize.py
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return names


def test_editable_install_maps_every_folder_into_one_root():
    import inversion_monitor.callbacks
    import inversion_monitor.proto
    import inversion_monitor.server

    assert Path(inversion_monitor.__file__).parent == ROOT / "monitor"
    assert Path(inversion_monitor.callbacks.__file__).parent == ROOT / "callbacks"
    assert Path(inversion_monitor.server.__file__).parent == ROOT / "server"
    assert Path(inversion_monitor.proto.__file__).parent == ROOT / "proto"


def test_no_bare_top_level_packages_are_installed():
    purelib = Path(sysconfig.get_paths()["purelib"])
    for bare in ("monitor", "server", "callbacks", "proto"):
        assert not (purelib / bare).exists(), f"a bare top-level package {bare!r} is installed"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports_every_module(tmp_path):
    # built from a copy without build/: setuptools would pack a stale build/lib's deleted modules
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
    )
    (wheel,) = dist.glob("inversion_monitor-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
    )
    # The dependencies come from this environment's site-packages (a plain path
    # entry: .pth files there, such as the editable finder, are not executed).
    site = Path(sysconfig.get_paths()["purelib"])
    fresh_site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (fresh_site / "deps.pth").write_text(f"{site}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", IMPORT_ALL],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    ).stdout.split()
    assert Path(out[0]).is_relative_to(env_dir), f"imported from {out[0]}, not the wheel"
    assert set(out[1].split(",")) == _source_module_names()
    bootstrap = env_dir.glob("lib/python*/site-packages/inversion_monitor/callbacks/_bootstrap")
    assert next(p / "sitecustomize.py" for p in bootstrap).is_file()
    # the live page's files (server/page.py serves them from the package)
    static = next(env_dir.glob("lib/python*/site-packages/inversion_monitor/server/static"))
    shipped = {str(p.relative_to(static)) for p in static.rglob("*") if p.is_file()}
    source = ROOT / "server" / "static"
    assert shipped == {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    console = env_dir / "bin" / "inversion-monitor"
    version = subprocess.run(
        [str(console), "--version"], check=True, capture_output=True, text=True, env=env
    ).stdout
    assert version.strip() == f"inversion-monitor {inversion_monitor.__version__}"


def test_server_and_proto_do_not_import_torch():
    code = (
        "import sys, inversion_monitor.server, inversion_monitor.proto, inversion_monitor.app.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
