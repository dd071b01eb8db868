"""The dependency direction of the tree: callbacks -> core -> proto <- server.

Static: every import statement (module level or not) of every source file.
Dynamic: importing each module in a fresh interpreter loads nothing it must not.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import inversion_monitor

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "monitor": "inversion_monitor",
    "callbacks": "inversion_monitor.callbacks",
    "server": "inversion_monitor.server",
    "proto": "inversion_monitor.proto",
}
PUBLIC = set(inversion_monitor.__all__)  # the root's public API, open to every layer but server
CORE_PACKAGES = ("metrics", "probe", "engine", "telemetry", "rl", "toy")
# what each layer may import from the project (prefixes); anything else of ours is a violation
ALLOWED = {
    "app": ("inversion_monitor",),
    "core": (
        "inversion_monitor._checks",
        "inversion_monitor._version",
        "inversion_monitor.config",
        "inversion_monitor.proto",
        *(f"inversion_monitor.{p}" for p in CORE_PACKAGES),
    ),
    "callbacks": (
        "inversion_monitor._checks",
        "inversion_monitor._version",
        "inversion_monitor.config",
        "inversion_monitor.callbacks",
        *(f"inversion_monitor.{p}" for p in CORE_PACKAGES),
    ),
    "server": ("inversion_monitor.server", "inversion_monitor.proto"),
    "proto": ("inversion_monitor.proto",),
}
# third-party packages a layer must never import, even lazily
FORBIDDEN_THIRD_PARTY = {
    "core": ("lightning", "pytorch_lightning"),
    "server": ("torch", "transformers", "lightning"),
    "proto": ("torch", "transformers", "lightning"),
}


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / folder).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    for layer in ("callbacks", "server", "proto"):
        if module.startswith(f"inversion_monitor.{layer}"):
            return layer
    return "app" if module.startswith("inversion_monitor.app") else "core"


def _sources() -> list[Path]:
    files = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or "_bootstrap" in path.parts:
                continue
            files.append(path)
    return files


def _from_target(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` statement in ``package`` reads from (relative resolved)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imports(source: str, module: str, *, is_package: bool) -> list[str]:
    tree = ast.parse(source)
    names: list[str] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(node, package)
            if target == "inversion_monitor":  # from inversion_monitor import x
                names.extend(
                    "inversion_monitor"
                    if alias.name in PUBLIC
                    else f"inversion_monitor.{alias.name}"
                    for alias in node.names
                )
            else:
                names.append(target)
    return names


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    return _check(module, path.read_text(), is_package=path.name == "__init__.py")


def _check(module: str, source: str, *, is_package: bool) -> list[str]:
    layer = _layer(module)
    found = []
    for name in _imports(source, module, is_package=is_package):
        if name.startswith("inversion_monitor"):
            if name == "inversion_monitor" and layer in ("server", "proto"):
                found.append(f"{module} ({layer}) imports the root package")
            elif name != "inversion_monitor" and not name.startswith(ALLOWED[layer]):
                found.append(f"{module} ({layer}) imports {name}")
        elif name.split(".")[0] in FORBIDDEN_THIRD_PARTY.get(layer, ()):
            found.append(f"{module} ({layer}) imports {name}")
    return found


def test_the_checker_reports_each_kind_of_violation() -> None:
    assert _module_name(ROOT / "monitor" / "probe" / "gradients.py") == (
        "inversion_monitor.probe.gradients"
    )
    core = "def f():\n    from inversion_monitor.server import app\n    import lightning\n"
    assert _check("inversion_monitor.probe.gradients", core, is_package=False) == [
        "inversion_monitor.probe.gradients (core) imports inversion_monitor.server",
        "inversion_monitor.probe.gradients (core) imports lightning",
    ]
    relative = "from ..app import demo\nfrom . import stats\n"
    assert _check("inversion_monitor.metrics.norms", relative, is_package=False) == [
        "inversion_monitor.metrics.norms (core) imports inversion_monitor.app"
    ]
    server = "import torch\nfrom inversion_monitor.probe.sampling import TokenSampler\n"
    assert len(_check("inversion_monitor.server.store", server, is_package=False)) == 2
    assert (
        _check("inversion_monitor.app.demo", "import inversion_monitor.server\n", is_package=False)
        == []
    )


def test_imports_point_one_way() -> None:
    violations = [v for path in _sources() for v in _violations(path)]
    assert violations == []


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in
    ('torch', 'transformers', 'lightning', 'pytorch_lightning')
    or m.startswith(('inversion_monitor.server', 'inversion_monitor.callbacks',
                     'inversion_monitor.app')))))
"""


def _loaded_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module], capture_output=True, text=True, check=True
    )
    return {
        name.split(".")[0] if "inversion" not in name else name for name in json.loads(out.stdout)
    }


@pytest.mark.parametrize(
    "module",
    [
        "inversion_monitor",
        "inversion_monitor.config",
        *(f"inversion_monitor.{p}" for p in CORE_PACKAGES),
        "inversion_monitor.engine.training_monitor",
        "inversion_monitor.telemetry.client",
        "inversion_monitor.rl.corrpo",
    ],
)
def test_core_loads_no_framework_server_or_app(module: str) -> None:
    loaded = _loaded_by(module)
    assert not loaded & {"transformers", "lightning", "pytorch_lightning"}, loaded
    assert not {m for m in loaded if m.startswith("inversion_monitor.")}, loaded


@pytest.mark.parametrize(
    "module",
    ["inversion_monitor.server", "inversion_monitor.server.app", "inversion_monitor.proto"],
)
def test_server_loads_no_torch(module: str) -> None:
    assert not _loaded_by(module) & {"torch", "transformers", "lightning"}


def test_callbacks_package_loads_no_framework() -> None:
    loaded = _loaded_by("inversion_monitor.callbacks")
    assert not loaded & {"transformers", "lightning", "torch"}, loaded


# ------------------------------------------------------------------ size and cycles

MAX_SOURCE_LINES = 650


def _all_sources() -> list[Path]:
    """Every hand-written source file of the four folders (generated ``*_pb2*`` excluded)."""
    return [
        path
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))
    ]


def test_no_source_file_is_over_650_lines() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in _all_sources()}
    over = [
        f"{path.relative_to(ROOT)}: {n} lines" for path, n in sizes.items() if n > MAX_SOURCE_LINES
    ]
    assert over == [], f"split these by job (at most {MAX_SOURCE_LINES} lines each): {over}"


def _import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, from every import statement anywhere in it.

    ``sources`` maps a module name to (its source, whether it is a package).
    ``from package import name`` counts as importing ``package.name`` when that
    is a module of the project, else ``package``; an import of a name outside
    ``sources`` is not ours and is left out.
    """
    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        targets: set[str] = set()
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _from_target(node, package)
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    targets.add(submodule if submodule in sources else target)
        graph[module] = {t for t in targets if t in sources and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in sorted(graph):
        if module not in index:
            visit(module)
    cycles = []
    for group in groups:  # a shortest way back to the group's first module
        first = min(group)
        paths = {first: [first]}
        frontier = [first]
        cycle: list[str] | None = None
        while frontier and cycle is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph[node] & group):
                    if child == first:
                        cycle = [*paths[node], first]
                        break
                    if child not in paths:
                        paths[child] = [*paths[node], child]
                        nxt.append(child)
                if cycle is not None:
                    break
            frontier = nxt
        assert cycle is not None
        cycles.append(cycle)
    return sorted(cycles)


def test_the_cycle_finder_sees_lazy_and_relative_imports() -> None:
    sources = {
        "pkg": ("", True),
        "pkg.a": ("def f():\n    from pkg import b\n", False),
        "pkg.b": ("from .c import x\n", False),
        "pkg.c": ("import pkg.a\n", False),
        "pkg.d": ("from pkg.a import f\n", False),
    }
    assert _cycles(_import_graph(sources)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    sources["pkg.c"] = ("import os\n", False)
    assert _cycles(_import_graph(sources)) == []


def test_no_import_cycles_among_the_projects_modules() -> None:
    sources = {
        _module_name(path): (path.read_text(), path.name == "__init__.py")
        for path in _all_sources()
        if path.suffix == ".py"
    }
    cycles = [" -> ".join(cycle) for cycle in _cycles(_import_graph(sources))]
    assert cycles == [], "import cycles (imports inside functions count):\n" + "\n".join(cycles)
