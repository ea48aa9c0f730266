"""No import cycles among the project's modules.

Every ``import`` and ``from ... import`` of a project module counts, wherever it stands: at module
level, inside a function (a deferred import hides a cycle at import time but not in the design) or
under ``if TYPE_CHECKING``. Importing ``pkg.sub`` implicitly runs ``pkg/__init__.py``; that implicit
parent import is not counted, so a package ``__init__`` may re-export its submodules.

Extending the check to another package is one entry in :data:`CHECKED_PACKAGES`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Packages whose modules must form an acyclic import graph (imports between them count too).
CHECKED_PACKAGES: tuple[str, ...] = ("edgeota_contract", "packager", "edgeota", "ota_server", "device_agent")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).parts)
    parts[-1] = parts[-1].split(".", 1)[0]  # mod.py, mod.pyi, mod.cpython-311-x86_64-linux-gnu.so -> mod
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Map each module name of ``package`` (``pkg.sub.mod``; a package is its ``__init__``) to its file.

    A compiled extension module (known by its ``.pyi`` stub or its ``.so``/``.pyd`` file) maps to that
    file: it is a module others import, but its own imports are not Python source to read.
    """
    base = root / package
    modules: dict[str, Path] = {}
    for pattern in ("*.so", "*.pyd", "*.pyi", "*.py"):  # the .py source, when there is one, wins
        for path in sorted(base.rglob(pattern)):
            modules[_module_name(path, root)] = path
    return modules


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from X import ...`` (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def imported_modules(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its source (see the module doc)."""
    known_set = set(known)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def closest_known(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in known_set:
                return candidate
            parts.pop()
        return None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one, else a name of ``pkg``.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known_set else base for alias in node.names]
        for target in targets:
            hit = closest_known(target)
            if hit is not None and hit != module:
                found.add(hit)
    return found


def import_graph(packages: Iterable[str], root: Path = ROOT) -> dict[str, set[str]]:
    """Edges ``module -> modules it imports``, restricted to the modules of ``packages``."""
    files: dict[str, Path] = {}
    for package in packages:
        files.update(module_files(package, root))
    return {
        name: imported_modules(name, path, files) if path.suffix == ".py" else set() for name, path in files.items()
    }


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as ``[a, b, ..., a]``.

    Tarjan's algorithm finds the components (iteratively, so deep graphs cannot overflow the stack);
    a depth-first search inside each component then returns one concrete cycle to name in the failure.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_one_cycle(graph, set(c)) for c in sorted(components)]


def _one_cycle(graph: Mapping[str, Iterable[str]], members: set[str]) -> list[str]:
    """A concrete cycle through the first member of a strongly connected component."""
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to ``start`` inside the component
        nxt_frontier: list[str] = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt in members and nxt not in parents and nxt != start:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")  # a component always has one


def test_checked_packages_have_no_import_cycles() -> None:
    graph = import_graph(CHECKED_PACKAGES)
    assert len(graph) > 20, "the scan found too few modules: the package list or the root is wrong"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_contract_imports_no_other_project_package() -> None:
    graph = import_graph(("edgeota_contract", "packager", "ota_server", "device_agent", "edgeota"))
    leaks = {m: sorted(t for t in ts if not t.startswith("edgeota_contract")) for m, ts in graph.items()}
    leaks = {m: ts for m, ts in leaks.items() if m.startswith("edgeota_contract") and ts}
    assert not leaks


def test_packager_does_not_import_the_cli_package() -> None:
    graph = import_graph(("edgeota_contract", "packager", "edgeota"))
    leaks = {
        m: sorted(t for t in ts if t == "edgeota" or t.startswith("edgeota."))
        for m, ts in graph.items()
        if m.startswith("packager")
    }
    assert not {m: ts for m, ts in leaks.items() if ts}


# ---- the checker itself ------------------------------------------------------------------


def _write_package(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from pkg import c\n    return c\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from pkg.a import thing\n",  # imports into the cycle, is not part of it
        },
    )
    cycles = find_cycles(import_graph(["pkg"], tmp_path))
    assert cycles == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_checker_resolves_relative_and_type_checking_imports(tmp_path: Path) -> None:
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import x\n",  # an __init__ re-exporting its submodule: no cycle
            "pkg/sub/__init__.py": "from .x import X\n",
            "pkg/sub/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..y import Y\n",
            "pkg/y.py": "from .sub import x\n",
        },
    )
    graph = import_graph(["pkg"], tmp_path)
    assert graph["pkg.sub"] == {"pkg.sub.x"} and graph["pkg.sub.x"] == {"pkg.y"}
    assert find_cycles(graph) == [["pkg.sub.x", "pkg.y", "pkg.sub.x"]]


def test_checker_knows_compiled_extension_modules(tmp_path: Path) -> None:
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\n",
            "pkg/a.py": "from pkg import _native\n",  # the extension module, not the package __init__
            "pkg/_native.pyi": "def f() -> int: ...\n",
            "pkg/_fast.cpython-311-x86_64-linux-gnu.so": "",
            "pkg/b.py": "from pkg import _fast\n",
        },
    )
    graph = import_graph(["pkg"], tmp_path)
    assert graph["pkg.a"] == {"pkg._native"} and graph["pkg.b"] == {"pkg._fast"} and graph["pkg._native"] == set()
    assert find_cycles(graph) == []


def test_checker_passes_an_acyclic_package(tmp_path: Path) -> None:
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import os\nimport pkg.b\n",
            "pkg/b.py": "from pkg import c\n",
            "pkg/c.py": "",
        },
    )
    assert find_cycles(import_graph(["pkg"], tmp_path)) == []
