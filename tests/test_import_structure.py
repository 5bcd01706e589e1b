"""The package's import structure, read from the source with `ast` (nothing is imported): no import cycles, and no
import that runs upward through the layers (issue 13).

Every `import` / `from ... import` statement counts, at module level or inside a function (a deferred import still
ties the two modules together), except those under `if TYPE_CHECKING:` (never run). Relative imports are resolved;
`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`. Importing `a.b.c` also runs
`a/__init__` and `a/b/__init__`, but those implicit parent edges are left out: every submodule would otherwise form a
cycle with its own package. An edge to a package `__init__` that is written out (`from .. import x`) does count.

The layers, bottom to top: `ops` and `kernels` (operators; `ops` picks a kernel, a kernel never imports `ops`),
`integration`, `conversion` and `generation` (the core), then the showcase (`showcase/`: `bench`, `demo*`, `tinylm`), which the
core never imports. `ops/reference.py` holds the naive references for the tests: the library does not import it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "hf_fastattn"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

CORE = ("ops", "kernels", "integration", "conversion", "generation")
# the core's layers, bottom to top: a module imports only from its own layer or lower ones
RANKS = {"kernels": 0, "ops": 1, "integration": 2, "conversion": 3, "generation": 3}
SHOWCASE = ("showcase", "tinylm")  # hf_fastattn.tinylm: the shim of showcase.tinylm
REFERENCE = f"{PACKAGE}.ops.reference"

# Modules kept for one release only to re-export names that moved, exempt from the layering rules (not from the
# cycle check). Each must do nothing but re-export: see `test_deprecated_shims_only_reexport`.
DEPRECATED_SHIMS = {
    f"{PACKAGE}.kernels.fastmax": "moved to hf_fastattn.ops.fast (PyTorch code, not a kernel)",
    f"{PACKAGE}.conversion.tiny": "moved to hf_fastattn.showcase.tinylm (the showcase's tiny teacher)",
    f"{PACKAGE}.tinylm": "moved to hf_fastattn.showcase.tinylm (the showcase apart from the core)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover() -> dict[str, Path]:
    """{module name: source path} for every module of the package."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """{imported package module: line of the first such import} for the module `name` at `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str, line: int):
        # the longest prefix that is a module of the package (`import a.b.c` where c is a function: a.b)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name, node.lineno)
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            child = f"{source}.{alias.name}"
            add(child if child in modules else source, node.lineno)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    modules = discover()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    edges = [f"    {a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items()) if b in inside]
    return "  cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def _violations(graph, source_ok, target_bad) -> list[str]:
    return [
        f"{a} imports {b} (line {line})"
        for a, targets in sorted(graph.items())
        if a not in DEPRECATED_SHIMS and source_ok(a)
        for b, line in sorted(targets.items())
        if target_bad(b)
    ]


def test_the_graph_is_read(graph):
    """The parser sees the package: known edges of each kind (absolute, relative, function-local) are found."""
    assert f"{PACKAGE}.ops.linear" in graph and f"{PACKAGE}.kernels.dispatch" in graph
    assert f"{PACKAGE}.conversion" in graph[PACKAGE]  # `from .conversion import convert` in the package __init__
    assert f"{PACKAGE}.ops.feature_maps" in graph[f"{PACKAGE}.ops.linear"]  # from .feature_maps import ...
    assert f"{PACKAGE}.kernels.dispatch" in graph[f"{PACKAGE}.ops.common"]  # a function-local import


def test_cycle_finder_finds_a_cycle():
    fake = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}, "e": {}}
    assert strongly_connected(fake) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles in the package:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_kernels_do_not_import_ops(graph):
    bad = _violations(graph, lambda a: _layer(a) == "kernels", lambda b: _layer(b) == "ops")
    assert not bad, "kernels (Triton, below the operators) must not import hf_fastattn.ops:\n  " + "\n  ".join(bad)


def test_library_does_not_import_the_references(graph):
    bad = _violations(graph, lambda a: True, lambda b: b == REFERENCE)
    assert not bad, (
        "ops/reference.py holds the naive references for tests; library code takes shared helpers from "
        "hf_fastattn.ops.common:\n  " + "\n  ".join(bad)
    )


def test_core_layers_import_downward_only(graph):
    def upward(a: str, b: str) -> bool:
        return _layer(a) in RANKS and _layer(b) in RANKS and RANKS[_layer(b)] > RANKS[_layer(a)]

    bad = [
        f"{a} imports {b} (line {line})"
        for a, targets in sorted(graph.items())
        if a not in DEPRECATED_SHIMS
        for b, line in sorted(targets.items())
        if upward(a, b)
    ]
    assert not bad, f"upward imports between the core's layers {RANKS}:\n  " + "\n  ".join(bad)


def _path_to(graph, start: str, goal) -> list[str] | None:
    """The first import path (breadth-first) from `start` to a module for which `goal` holds, not passing through
    a deprecated shim (nothing may import one: `test_nothing_imports_a_deprecated_shim`)."""
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        if node != start and goal(node):
            path = [node]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            return path[::-1]
        if node in DEPRECATED_SHIMS and node != start:
            continue
        for child in sorted(graph.get(node, ())):
            if child not in parents:
                parents[child] = node
                queue.append(child)
    return None


def test_core_does_not_reach_the_showcase(graph):
    """Not directly, nor through any chain of imports."""
    paths = [
        _path_to(graph, a, lambda b: _layer(b) in SHOWCASE)
        for a in sorted(graph)
        if _layer(a) in CORE and a not in DEPRECATED_SHIMS
    ]
    bad = [" -> ".join(p) for p in paths if p]
    assert not bad, "the core (" + ", ".join(CORE) + ") must not import the showcase:\n  " + "\n  ".join(bad)


def test_nothing_imports_a_deprecated_shim(graph):
    bad = _violations(graph, lambda a: True, lambda b: b in DEPRECATED_SHIMS)
    assert not bad, "these modules re-export moved names for users; import from the new home:\n  " + "\n  ".join(bad)


def test_deprecated_shims_only_reexport():
    """A module kept for one release to re-export moved names holds nothing but imports, `__all__` and a docstring."""
    modules = discover()
    for name, why in DEPRECATED_SHIMS.items():
        assert name in modules, f"{name} is listed as a deprecated shim ({why}) but does not exist: drop it"
        tree = ast.parse(modules[name].read_text(encoding="utf-8"))
        for node in tree.body:
            is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            is_all = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
            assert is_doc or is_all or isinstance(node, (ast.Import, ast.ImportFrom)), (
                f"{name} (line {node.lineno}) is a re-export shim ({why}) and must hold only imports"
            )


def test_the_layer_checks_catch_violations():
    """Each check fails on a small made-up graph that breaks its rule (so a green run means something)."""
    upward = {"hf_fastattn.ops.x": {"hf_fastattn.integration.y": 3}, "hf_fastattn.integration.y": {}}
    with pytest.raises(AssertionError, match="hf_fastattn.ops.x imports hf_fastattn.integration.y"):
        test_core_layers_import_downward_only(upward)
    chain = {"hf_fastattn.ops.a": {"hf_fastattn.ops.b": 1}, "hf_fastattn.ops.b": {"hf_fastattn.showcase.bench.c": 2}}
    with pytest.raises(AssertionError, match="hf_fastattn.ops.a -> hf_fastattn.ops.b -> hf_fastattn.showcase.bench.c"):
        test_core_does_not_reach_the_showcase({**chain, "hf_fastattn.showcase.bench.c": {}})
    with pytest.raises(AssertionError, match="hf_fastattn.kernels.k imports hf_fastattn.ops.o"):
        test_kernels_do_not_import_ops({"hf_fastattn.kernels.k": {"hf_fastattn.ops.o": 1}})
    with pytest.raises(AssertionError, match="hf_fastattn.integration.i imports hf_fastattn.ops.reference"):
        test_library_does_not_import_the_references({"hf_fastattn.integration.i": {REFERENCE: 1}})


MOVED = [  # (old home, new home, name): names that moved in issue 13 keep working from where they were
    ("hf_fastattn.kernels", "hf_fastattn.ops.fast", "fast_attention_triton"),
    ("hf_fastattn.kernels.fastmax", "hf_fastattn.ops.fast", "fast_attention_triton"),
    *(
        ("hf_fastattn.ops.reference", "hf_fastattn.ops.common", name)
        for name in ("repeat_kv", "allowed_mask", "fast_normalize", "fastmax_weight", "sparse_pattern_mask")
    ),
    ("hf_fastattn.ops.sparse", "hf_fastattn.ops.common", "sparse_pattern_mask"),
    ("hf_fastattn.ops.linear", "hf_fastattn.ops.common", "use_triton"),
    ("hf_fastattn.ops.linear", "hf_fastattn.ops.linear_cpu", "_chunk_products"),
    *(
        ("hf_fastattn.ops.hybrid", "hf_fastattn.ops.hybrid_chunked", name)
        for name in ("sliding_window_linear_attention", "LINEAR_WEIGHTS", "check_hybrid_options", "sink_positions")
    ),
    *(
        ("hf_fastattn.conversion.core", "hf_fastattn.conversion.registry", name)
        for name in (
            "CONVERSION_KEY",
            "CONVERSION_METHODS",
            "MethodConfig",
            "attach_from_config",
            "conversion_spec",
            "get_method",
            "method_config",
            "register_conversion_method",
        )
    ),
]


@pytest.mark.parametrize("old,new,name", MOVED, ids=[f"{o.split('.')[-1]}.{n}" for o, _, n in MOVED])
def test_moved_names_still_import_from_their_old_home(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
