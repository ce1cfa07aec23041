"""The package's import structure (docs/design.md): no import cycle inside vgs_train, its modules import
only from their own layer or the ones below, and vgs_kernels never imports vgs_train. Every import counts,
the ones inside functions too (a lazy import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# vgs_train's layers, bottom up, one folder each (the modules at the top level name their own):
# config and data -> models -> the pipeline pieces -> the loops (and other trainers' recipes) -> tools -> the CLIs
LAYERS = [
    ("config and data", {"config", "machine", "data"}),
    ("models", {"models"}),
    ("pipeline", {"pipeline"}),
    ("loops", {"loops", "integrations"}),
    ("tools", {"tools"}),
    ("command lines", {"cli", "__main__", "__init__"}),
]


def layer_names(g) -> dict[str, int]:
    """{module: layer index}: a module's layer is its folder's (or, at the top level, its own name's)."""
    index = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
    return {m: index[m.split(".")[0]] for m in g if m.split(".")[0] in index}


def modules(package: str) -> dict[str, str]:
    """{dotted name inside the package ('' for the package itself): file path}."""
    base = os.path.join(ROOT, package)
    out = {}
    for folder, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), base)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def imports(path: str, package: str, name: str) -> set[str]:
    """Absolute module names ``path`` imports (every ``import`` / ``from ... import``, at any depth)."""
    is_pkg = path.endswith("__init__.py")
    here = [package] + (name.split(".") if name and name != "__init__" else [])
    if not is_pkg:
        here = here[:-1]  # the package a module lives in
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import synthetic`
    return found


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    g = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports(path, package, name):
            if imp == package or imp.startswith(package + "."):
                rel = imp[len(package) + 1:]
                while rel and rel not in mods:  # `from .config import X` names X too: keep the module
                    rel = rel.rpartition(".")[0]
                if rel != name and rel in mods:
                    targets.add(rel)
        g[name or "__init__"] = {t or "__init__" for t in targets}
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle_in_vgs_train():
    cycle = find_cycle(graph("vgs_train"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_vgs_train_imports_only_downwards():
    g = graph("vgs_train")
    layer = layer_names(g)
    unplaced = sorted(set(g) - set(layer))
    assert not unplaced, f"modules without a layer (add them to LAYERS and docs/design.md): {unplaced}"
    upward = [f"{a} ({LAYERS[layer[a]][0]}) imports {b} ({LAYERS[layer[b]][0]})"
              for a, targets in g.items() for b in targets if layer[b] > layer[a]]
    assert not upward, "imports against the layers: " + "; ".join(sorted(upward))


def test_the_pipeline_never_reaches_into_the_embedded_cache():
    g = graph("vgs_train")
    bad = sorted(m for m, targets in g.items() if m.startswith(("pipeline", "models", "data")) and
                 any(t.startswith("loops") for t in targets))
    assert not bad, f"modules below the loops importing them (the embedded cache lives in loops.embedded): {bad}"


def test_vgs_kernels_never_imports_vgs_train():
    bad = [f"vgs_kernels.{name}" for name, path in modules("vgs_kernels").items()
           if any(i == "vgs_train" or i.startswith("vgs_train.") for i in imports(path, "vgs_kernels", name))]
    assert not bad, f"vgs_kernels modules importing vgs_train: {bad}"


def test_the_checks_see_cycles_and_upward_imports():
    """The checks are not vacuous: the graph holds the imports the package is known to make, and a cycle
    in a hand-made graph is found."""
    g = graph("vgs_train")
    assert {"pipeline.pipe", "config", "loops.checkpoint", "loops.grpo"} <= g["loops.trainer"]
    assert "trl" not in g and {"pipeline.pipe", "pipeline.distributed"} <= g["integrations.trl"]
    assert "data.synthetic" in g["loops.embedded"]  # `from ..data import synthetic`
    assert "machine" in g["loops.embedded"]  # `from .. import machine`, inside a function: it counts
    layer = layer_names(g)
    assert layer["tools.demo"] > layer["loops.trainer"] > layer["pipeline.views"] > layer["data.examples"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
