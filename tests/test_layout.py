"""The layout of docs/ARCHITECTURE.md, checked: imports point downward and form no cycle.

Every import in the package is read from the source (lazy imports inside functions too),
so a violation is found even where it would not fail at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tensorwire"

# Rank of each top-level part (docs/ARCHITECTURE.md, "Layers"): a module may import a part
# of a lower rank, or its own part. Parts of one rank do not import each other.
RANKS = {
    "errors": 0,
    "sysinfo": 1,
    "models": 1,
    "data": 1,
    "diagnose": 1,
    "codec": 2,
    "container": 3,
    "integrations": 4,
    "benchmarking": 5,
    "kv": 5,
    "search": 6,
    "control": 6,
    "serve": 7,
    "testing": 9,
    "demo": 9,
    "cli": 10,
}
# An integration that sits on top of the serving system rather than under the KV layer.
PART_OVERRIDES = {"integrations.vllm": ("vllm", 8)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every tensorwire module ``name`` imports (a ``from pkg import sub`` counts as ``pkg.sub``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return {m for m in found if m in MODULES}


def part_of(name: str) -> tuple[str, int] | None:
    """``(part, rank)`` of a module, None for the package root (the public API facade)."""
    rest = name.removeprefix("tensorwire").lstrip(".")
    if not rest:
        return None
    for prefix, part in PART_OVERRIDES.items():
        if rest == prefix or rest.startswith(prefix + "."):
            return part
    top = rest.split(".")[0]
    if top not in RANKS:
        raise AssertionError(f"{name} belongs to no part of the layout; add {top!r} to docs/ARCHITECTURE.md and RANKS")
    return top, RANKS[top]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_downward(name):
    source = part_of(name)
    wrong = []
    for target in sorted(imports_of(name)):
        dest = part_of(target)
        if source is None or dest is None or dest[0] == source[0]:
            continue  # the root re-exports the API; sysinfo reads the root's __version__
        if dest[1] >= source[1]:
            wrong.append(f"{target} ({dest[0]}, rank {dest[1]})")
    assert not wrong, f"{name} ({source[0]}, rank {source[1]}) imports upward or sideways: {wrong}"


def test_no_import_cycles():
    """No cycle among modules, lazy imports included; a package's ``__init__`` (a facade
    over its own modules) is left out of the graph."""
    facades = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    graph = {n: imports_of(n) - facades for n in MODULES if n not in facades}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_architecture_page_names_every_part():
    page = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    for part in RANKS:
        assert f"`{part}" in page, f"docs/ARCHITECTURE.md does not describe {part!r}"
