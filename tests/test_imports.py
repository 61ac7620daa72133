"""The package's import graph has no cycles.

A cycle makes import order matter: whichever module of the cycle is imported first sees the others
half initialized, which fails (or not) depending on who imports what first. The graph is built from
the sources with ``ast``, so it needs no imports and sees every file: ``dmm`` and the folders that
pyproject's ``package-dir`` maps into it (``server/`` -> ``dmm.server``, ...). Module-level and
function-level imports both count (a function-level import only moves the cycle to call time);
imports under ``if TYPE_CHECKING:`` do not, as they never run. ``importlib.import_module`` counts
too: with a literal name, that module; with a computed one, every module the file names in a string
(how ``dmm.cli`` once loaded the application CLIs that imported it back).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, the same parser, which pytest depends on there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

Graph = dict[str, set[str]]


def package_dirs(root: Path) -> dict[str, Path]:
    """pyproject's ``[tool.setuptools] package-dir``: package name -> its folder."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    return {name: root / folder for name, folder in pyproject["tool"]["setuptools"]["package-dir"].items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name -> its file; a file two mappings reach belongs to the deeper package."""
    found: dict[str, tuple[int, Path]] = {}
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            depth = package.count(".")
            if name not in found or found[name][0] < depth:
                found[name] = (depth, path)
    return {name: path for name, (_, path) in found.items()}


class _ImportCollector(ast.NodeVisitor):
    """The absolute names a module imports, wherever they occur (``if TYPE_CHECKING:`` bodies aside)."""

    def __init__(self, package: str) -> None:
        self.package = package  # what a relative import is relative to
        self.names: set[str] = set()
        self.strings: set[str] = set()  # every string literal: what a computed import_module may name
        self.computed_import = False

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module, node.level)
        self.names.add(base)
        # ``from package import submodule`` imports the submodule; a name that is no module is dropped
        # by edges_of, which keeps only the modules of the graph.
        self.names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")

    def visit_Call(self, node: ast.Call) -> None:
        """``importlib.import_module("dmm.x")``: an import, too, when the name is a literal."""
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called == "import_module" and node.args:
            name = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
            if isinstance(name, str) and not name.startswith("."):
                self.names.add(name)
            else:
                self.computed_import = True
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            self.strings.add(node.value)

    def _absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = self.package.split(".")
        if level - 1 >= len(parts):
            raise ValueError(f"relative import beyond the top package in {self.package}")
        base = parts[: len(parts) - (level - 1)]
        return ".".join(base + ([module] if module else []))


def imported_names(module: str, path: Path, modules: set[str]) -> set[str]:
    """The absolute dotted names ``module`` (at ``path``) imports; ``modules``: the graph's modules."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    collector = _ImportCollector(package)
    collector.visit(ast.parse(path.read_text(), filename=str(path)))
    if collector.computed_import:
        return collector.names | (collector.strings & modules)
    return collector.names


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def edges_of(module: str, names: set[str], modules: set[str]) -> set[str]:
    """The modules of the graph that importing ``names`` runs, seen from ``module``.

    ``import a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``; the packages that contain ``module`` itself
    are already imported when it runs (Python imports them first), so they are no edges.
    """
    already = {*_ancestors(module), module}
    targets: set[str] = set()
    for name in names:
        while name and name not in modules:  # ``from a import f``: f is an attribute of a
            name = name.rpartition(".")[0]
        if name:
            targets.update(m for m in (*_ancestors(name), name) if m in modules and m not in already)
    return targets


def import_graph(root: Path) -> Graph:
    """Module -> the modules of the package it imports, for every module under ``root``'s package-dir."""
    files = module_files(package_dirs(root))
    modules = set(files)
    return {m: edges_of(m, imported_names(m, path, modules), modules) for m, path in files.items()}


def cyclic_components(graph: Graph) -> list[set[str]]:
    """The strongly connected components that hold a cycle (Tarjan), in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found, key=sorted)


def a_cycle(graph: Graph, component: set[str]) -> list[str]:
    """One cycle through ``component``'s first module, as a path that ends where it starts."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    nxt.append(succ)
        frontier = nxt
    raise ValueError(f"{sorted(component)} holds no cycle")


def describe_cycles(graph: Graph) -> list[str]:
    """One line per cyclic component: a cycle in it, and the component's other modules if it has more."""
    lines = []
    for component in cyclic_components(graph):
        cycle = a_cycle(graph, component)
        rest = sorted(component - set(cycle))
        lines.append(" -> ".join(cycle) + (f" (with {', '.join(rest)} in the same tangle)" if rest else ""))
    return lines


# ------------------------------------------------------------------------------------------ the checks


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(REPO)
    assert {"dmm.cli", "dmm.server.cli", "dmm.trainer.cli", "dmm.client.cli"} <= set(graph)
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cli_imports_the_application_clis_and_they_do_not_import_it() -> None:
    graph = import_graph(REPO)
    apps = {"dmm.server.cli", "dmm.trainer.cli", "dmm.client.cli"}
    assert apps <= graph["dmm.cli"]
    assert all("dmm.cli" not in graph[app] for app in apps)


def test_a_cycle_finder_finds_cycles_and_only_cycles() -> None:
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert cyclic_components(acyclic) == []
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cyclic_components(graph) == [{"a", "b", "c"}, {"e"}]
    assert describe_cycles(graph) == ["a -> b -> c -> a", "e -> e"]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_graph_sees_relative_function_level_and_mapped_imports(tmp_path: Path) -> None:
    """A cycle through a mapped folder, a relative import and a function-level import is found."""
    _write(
        tmp_path,
        {
            "pyproject.toml": '[tool.setuptools]\npackage-dir = { "pkg" = "pkg", "pkg.app" = "app" }\n',
            "pkg/__init__.py": "",
            "pkg/cli.py": "import importlib\n\ndef main():\n    importlib.import_module('pkg.app.cli')\n",
            "pkg/util.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import cli\n",
            "app/__init__.py": "",
            "app/cli.py": "from . import helpers\n",
            "app/helpers.py": "def f():\n    from ..cli import main\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["pkg.app.cli"] == {"pkg.app.helpers"}
    assert graph["pkg.app.helpers"] == {"pkg.cli"}
    assert graph["pkg.util"] == set()  # TYPE_CHECKING imports never run
    assert describe_cycles(graph) == ["pkg.app.cli -> pkg.app.helpers -> pkg.cli -> pkg.app.cli"]


def test_a_computed_import_module_counts_the_modules_the_file_names(tmp_path: Path) -> None:
    """The shape of the cycle dmm.cli once had: sub-CLIs loaded by name, importing the loader back."""
    _write(
        tmp_path,
        {
            "pyproject.toml": '[tool.setuptools]\npackage-dir = { "pkg" = "pkg" }\n',
            "pkg/__init__.py": "",
            "pkg/cli.py": "import importlib\nAPPS = {'pkg.app': 1, 'pkg.nothing': 2}\n"
            "def build():\n    for name in APPS:\n        importlib.import_module(name)\n",
            "pkg/app.py": "from pkg.cli import build\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["pkg.cli"] == {"pkg.app"}
    assert describe_cycles(graph) == ["pkg.app -> pkg.cli -> pkg.app"]


def test_importing_a_submodule_runs_its_packages_init(tmp_path: Path) -> None:
    """``import pkg.sub.mod`` from outside runs ``pkg/sub/__init__.py``: a cycle through it counts."""
    _write(
        tmp_path,
        {
            "pyproject.toml": '[tool.setuptools]\npackage-dir = { "pkg" = "pkg" }\n',
            "pkg/__init__.py": "",
            "pkg/top.py": "import pkg.sub.mod\n",
            "pkg/sub/__init__.py": "from pkg.sub.other import x\n",
            "pkg/sub/other.py": "from pkg.top import y\n",
            "pkg/sub/mod.py": "from pkg.sub import other\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["pkg.sub.mod"] == {"pkg.sub.other"}  # its own package is imported before it runs
    assert describe_cycles(graph) == [
        "pkg.sub -> pkg.sub.other -> pkg.top -> pkg.sub (with pkg.sub.mod in the same tangle)"
    ]


def test_a_relative_import_above_the_top_package_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/mod.py": "from ... import x\n"})
    with pytest.raises(ValueError, match="beyond the top package"):
        imported_names("pkg.mod", tmp_path / "pkg" / "mod.py", {"pkg", "pkg.mod"})
