"""The package's shape: imports go one way (no cycles, kernels a leaf, no layer imports a higher one), no private
name imported across modules, no library file over 600 lines. Imports inside functions count as much as
module-level ones."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("nemojax", "pallas_kernels")
MAX_LINES = 600

# Bottom to top. A module may import its own layer or lower ones. The longest matching prefix decides.
LAYERS = {
    "pallas_kernels": 0,
    "nemojax.version": 1, "nemojax.config": 1, "nemojax.formats": 1,
    "nemojax.kernels": 2, "nemojax.ops": 2,
    "nemojax.blocks": 3, "nemojax.params": 3, "nemojax.cache": 3, "nemojax.sharding": 3, "nemojax.model": 4,
    "nemojax.sampling": 5, "nemojax.tokenizer": 5, "nemojax.chat": 5, "nemojax.generate": 5,
    "nemojax.experts": 6, "nemojax.quant": 6,
    "nemojax.checkpoint": 7,
    "nemojax.api": 8,
    "nemojax.serve": 9,
    "nemojax.cli": 10, "nemojax.__main__": 10, "nemojax": 11,
}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(mods: dict[str, pathlib.Path]) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """module -> {(imported project module, names taken from it)}, every import statement of the file."""
    graph: dict[str, set] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        graph[m].add((a.name, ()))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] not in PACKAGES:
                    continue
                names = []
                for a in node.names:
                    if f"{target}.{a.name}" in mods:  # `from pkg import submodule`
                        graph[m].add((f"{target}.{a.name}", ()))
                    else:
                        names.append(a.name)
                if names:
                    graph[m].add((target, tuple(names)))
    return graph


def layer(m: str) -> int:
    best = max((p for p in LAYERS if m == p or m.startswith(p + ".")), key=len, default=None)
    if best is None or (best == "nemojax" and m != "nemojax"):
        raise AssertionError(f"module {m} has no layer in tests/test_architecture.py LAYERS: place it")
    return LAYERS[best]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


MODS = modules()
GRAPH = imports(MODS)
EDGES = {m: {t for t, _ in deps if t in MODS and t != m} for m, deps in GRAPH.items()}


def test_the_graph_sees_function_level_imports():
    # the checker itself: a function-level import is an edge, a cycle through it is found
    src = "def f():\n    from .b import g\n"
    tree = ast.parse(src)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "b" and n.level == 1 for n in ast.walk(tree))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert cycles({"a": {"a"}}) == [["a"]]


def test_no_import_cycles():
    assert cycles(EDGES) == []


def test_kernels_import_nothing_from_the_library():
    bad = sorted((m, t) for m, deps in EDGES.items() if m.startswith("pallas_kernels") for t in deps
                 if not t.startswith("pallas_kernels"))
    assert bad == []


def test_no_layer_imports_a_higher_one():
    bad = sorted(f"{m} (layer {layer(m)}) -> {t} (layer {layer(t)})" for m, deps in EDGES.items() for t in deps
                 if layer(t) > layer(m) and not t.startswith(m + "."))  # a package's __init__ may gather its modules
    assert bad == []


def test_no_private_names_across_modules():
    bad = sorted(f"{m} takes {n} from {t}" for m, deps in GRAPH.items() for t, names in deps if t != m
                 for n in names if n.startswith("_") and not n.startswith("__"))
    assert bad == []


def test_library_files_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in MODS.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: split by concern"
