"""The import layers of the package: every import points down or sideways, and no two modules import each other.

Layers, lowest first (docs/architecture.md):
    config < masking < data < encoders < methods < checkpoint < features < engine < eval < bench < cli

The checker reads the source with `ast` and imports nothing, so it runs in well under a second. It sees module-level
and function-level imports alike: a deferred import still ties the two modules together. `mimtrain/__init__.py` is
exempt as a source (it imports `encoders` only to register them with timm), and a bare `import mimtrain` adds no
edge, since every `import mimtrain.x` runs the root package anyway.
"""
from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "mimtrain"

# (layer, module prefixes); a module belongs to the first layer with a prefix equal to its name or a parent of it.
LAYERS = [
    ("config", ["mimtrain.config"]),
    ("masking", ["mimtrain.masking"]),
    ("data", ["mimtrain.data"]),
    ("encoders", ["mimtrain.encoders"]),
    ("methods", ["mimtrain.methods"]),
    ("checkpoint", ["mimtrain.checkpoint"]),
    ("features", ["mimtrain.features"]),
    ("engine", ["mimtrain.engine"]),
    ("eval", ["mimtrain.eval"]),
    ("bench", ["mimtrain.bench"]),
    ("cli", ["mimtrain.cli", "mimtrain.__main__"]),
]
EXEMPT_SOURCES = {PACKAGE}


@dataclass(frozen=True)
class Edge:
    """One import statement inside the package: `src` imports `dst` (both dotted module names)."""
    src: str
    dst: str
    path: str  # the file of src, relative to the repository root
    line: int
    deferred: bool  # inside a function: not run at import time, but still a dependency

    def where(self) -> str:
        return f"{self.path}:{self.line}{' (in a function)' if self.deferred else ''}"


def module_name(rel_path: str) -> str:
    """'mimtrain/encoders/base.py' -> 'mimtrain.encoders.base'; 'mimtrain/encoders/__init__.py' ->
    'mimtrain.encoders'."""
    parts = rel_path[:-len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """Index into LAYERS, or None for a module that no layer claims (the real-package test reports those)."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _known(name: str, modules: set[str]) -> str | None:
    """The longest prefix of `name` that is a module of the package (`mimtrain.a.b.func` -> `mimtrain.a.b`)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _deferred_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function body (run on call, not on import)."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def _targets(node: ast.Import | ast.ImportFrom, src: str, is_package: bool, modules: set[str]) -> list[str]:
    """The package modules one import statement names. `from pkg import name` counts as importing `pkg.name` when
    that is a submodule, else as importing `pkg` (its __init__ runs and provides the name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: level 1 is the package that holds src (src itself when it is an __init__)
            pkg = src.split(".") if is_package else src.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        if name.startswith(PACKAGE + "."):  # a bare `mimtrain` (the root package) adds no edge
            target = _known(name, modules)
            if target and target not in (src, PACKAGE) and target not in out:
                out.append(target)
    return out


def collect_edges(sources: dict[str, str]) -> list[Edge]:
    """sources: {'mimtrain/x/y.py': source text}. Returns every import edge between package modules."""
    modules = {module_name(p) for p in sources}
    edges = []
    for path, text in sorted(sources.items()):
        src = module_name(path)
        if src in EXEMPT_SOURCES:
            continue
        tree = ast.parse(text, filename=path)
        deferred = _deferred_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dst in _targets(node, src, path.endswith("__init__.py"), modules):
                    edges.append(Edge(src, dst, path, node.lineno, id(node) in deferred))
    return edges


def upward_imports(edges: list[Edge]) -> list[str]:
    """One line per import that points to a higher layer."""
    out = []
    for e in edges:
        lo, hi = layer_of(e.src), layer_of(e.dst)
        if lo is not None and hi is not None and hi > lo:
            out.append(f"{e.where()}: {e.src} imports {e.dst} ({LAYERS[lo][0]} -> {LAYERS[hi][0]})")
    return out


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion depth should not depend on it)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _cycle_through(start: str, graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    parent, frontier = {}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in graph[node]:
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if child in members and child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def import_cycles(edges: list[Edge]) -> list[str]:
    """One line per group of mutually importing modules: the group, then one cycle through it with each edge's
    location, so the reader sees which statement to move."""
    graph: dict[str, list[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for e in edges:
        graph.setdefault(e.src, [])
        graph.setdefault(e.dst, [])
        if e.dst not in graph[e.src]:
            graph[e.src].append(e.dst)
        where.setdefault((e.src, e.dst), e.where())
    out = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue  # self-imports are dropped when the edges are collected
        path = _cycle_through(component[0], graph, set(component))
        steps = ", ".join(f"{a} -> {b} [{where[a, b]}]" for a, b in zip(path, path[1:]))
        out.append(f"cycle among {{{', '.join(component)}}}: {steps}")
    return out


def package_sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def test_checker_reports_upward_imports_and_cycles():
    """A fake package with one upward import, one three-module cycle, and imports that must not be reported:
    downward, sideways, relative, a package __init__ re-exporting its submodules, the exempt root."""
    fake = {
        "mimtrain/__init__.py": "from mimtrain import encoders\nimport mimtrain.cli\n",
        "mimtrain/config/__init__.py": "",
        "mimtrain/config/pretrain.py": "import os\n\ndef f():\n    from mimtrain.engine import trainer\n",
        "mimtrain/masking.py": "import torch\n",
        "mimtrain/encoders/__init__.py": "from mimtrain.encoders import base, vit\nfrom .vit import ViT\n",
        "mimtrain/encoders/base.py": "import mimtrain\nfrom mimtrain import masking\n",
        "mimtrain/encoders/vit.py": "from .base import MIMEncoder\n",
        "mimtrain/engine/__init__.py": "",
        "mimtrain/engine/trainer.py": "from . import optim\nfrom mimtrain.encoders import build_encoder\n",
        "mimtrain/engine/optim.py": "from ..encoders.vit import VisionTransformer\nfrom .schedule import cosine\n",
        "mimtrain/engine/schedule.py": "import math\nimport mimtrain.engine.trainer as t\n",
        "mimtrain/cli.py": "import mimtrain.engine.trainer as t\n",
    }
    edges = collect_edges(fake)
    assert {(e.src, e.dst) for e in edges} == {
        ("mimtrain.config.pretrain", "mimtrain.engine.trainer"),
        ("mimtrain.encoders", "mimtrain.encoders.base"), ("mimtrain.encoders", "mimtrain.encoders.vit"),
        ("mimtrain.encoders.base", "mimtrain.masking"), ("mimtrain.encoders.vit", "mimtrain.encoders.base"),
        ("mimtrain.engine.trainer", "mimtrain.engine.optim"), ("mimtrain.engine.trainer", "mimtrain.encoders"),
        ("mimtrain.engine.optim", "mimtrain.encoders.vit"), ("mimtrain.engine.optim", "mimtrain.engine.schedule"),
        ("mimtrain.engine.schedule", "mimtrain.engine.trainer"),
        ("mimtrain.cli", "mimtrain.engine.trainer"),
    }
    assert upward_imports(edges) == [
        "mimtrain/config/pretrain.py:4 (in a function): mimtrain.config.pretrain imports mimtrain.engine.trainer "
        "(config -> engine)"]
    assert import_cycles(edges) == [
        "cycle among {mimtrain.engine.optim, mimtrain.engine.schedule, mimtrain.engine.trainer}: "
        "mimtrain.engine.optim -> mimtrain.engine.schedule [mimtrain/engine/optim.py:2], "
        "mimtrain.engine.schedule -> mimtrain.engine.trainer [mimtrain/engine/schedule.py:2], "
        "mimtrain.engine.trainer -> mimtrain.engine.optim [mimtrain/engine/trainer.py:1]"]
    # a package __init__ that imports its submodules is a cycle only if a submodule imports the package back
    fake["mimtrain/encoders/base.py"] = "import mimtrain.encoders\n"
    assert ("cycle among {mimtrain.encoders, mimtrain.encoders.base, mimtrain.encoders.vit}: "
            "mimtrain.encoders -> mimtrain.encoders.base [mimtrain/encoders/__init__.py:1], "
            "mimtrain.encoders.base -> mimtrain.encoders [mimtrain/encoders/base.py:1]") in import_cycles(
        collect_edges(fake))
    # a module that no layer claims is caught
    assert layer_of("mimtrain.utils") is None and layer_of("mimtrain.eval.dense.upernet") == 8


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in map(module_name, package_sources()) if m not in EXEMPT_SOURCES and
                      layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS here and to docs/architecture.md): {unplaced}"


def test_imports_point_down_and_form_no_cycle():
    edges = collect_edges(package_sources())
    problems = upward_imports(edges) + import_cycles(edges)
    assert not problems, (f"{len(problems)} import-layer problem(s); layers, lowest first: "
                          f"{' < '.join(name for name, _ in LAYERS)}\n" + "\n".join(problems))
