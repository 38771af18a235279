"""The package's import contract, read from the source (AST; nothing is imported but the
method registry): layers only import downwards, module-level imports form no cycle,
imports inside functions exist only to keep torch/faiss/Ray off a cheap path, and method
names are compared only inside ``ltc_ray/cluster``.

Layers, lowest first (a module may import its own layer or a lower one):

0. base: ltc_ray, errors, redact, params, plan_model, runtime, io, knn, graph, metrics,
   synthetic, embed (images -> embeddings), export (folder layout)
1. models  2. cluster (methods)  3. config, report (a run's overview, HTML)  4. pipeline
5. serve (the results browser)  6. cli
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ltc_ray"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ltc_ray", "ltc_ray.errors", "ltc_ray.redact", "ltc_ray.params", "ltc_ray.plan_model",
     "ltc_ray.runtime", "ltc_ray.io", "ltc_ray.knn", "ltc_ray.graph", "ltc_ray.metrics",
     "ltc_ray.synthetic", "ltc_ray.embed", "ltc_ray.export"),
    ("ltc_ray.models",),
    ("ltc_ray.cluster",),
    ("ltc_ray.config", "ltc_ray.report"),  # report reads which parameters are cosines
    ("ltc_ray.pipeline",),
    ("ltc_ray.serve",),  # the web page over results; runs re-clusters as cluster jobs
    ("ltc_ray.cli",),  # the package: one module per verb (demo included)
)
# the imports a cheap path must not pay for, and optional extras (ui, onnx) it must not need
HEAVY = frozenset({"torch", "faiss", "ray", "fastapi", "starlette", "uvicorn", "onnxruntime"})


@dataclass(frozen=True)
class Import:
    """One ``ltc_ray`` import: ``target`` is the module it loads (``from pkg import sub``
    resolved to the submodule); ``local`` when inside a function; ``runtime`` False under
    ``if TYPE_CHECKING:``."""

    source: str
    target: str
    line: int
    text: str
    local: bool
    runtime: bool

    def where(self) -> str:
        return f"{self.source}:{self.line} `{self.text}`"


@dataclass
class Graph:
    """Every module's ``ltc_ray`` imports and the heavy packages it imports at load time."""

    modules: dict[str, ast.Module]
    imports: list[Import]
    heavy_direct: dict[str, set[str]]

    def top(self, module: str) -> list[Import]:
        return [i for i in self.imports if i.source == module and not i.local and i.runtime]


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def build_graph(sources: dict[str, tuple[str, bool]]) -> Graph:
    """``sources``: module name -> (source text, is a package ``__init__``)."""
    modules = {name: ast.parse(text, filename=name) for name, (text, _) in sources.items()}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    imports: list[Import] = []
    heavy_direct: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        package = name if sources[name][1] else name.rsplit(".", 1)[0]

        def visit(node: ast.AST, local: bool, runtime: bool, name=name, package=package) -> None:
            for child in ast.iter_child_nodes(node):
                child_local = local or isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                child_runtime = runtime and not (_is_type_checking(node) and child in node.body)
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: from the importing module's package
                        anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 \
                            else package
                        base = f"{anchor}.{base}" if base else anchor
                    subs = [f"{base}.{a.name}" for a in child.names]
                    targets = [s for s in subs if s in modules]
                    if len(targets) < len(subs):  # a name defined in ``base`` itself
                        targets.append(base)
                else:
                    visit(child, child_local, child_runtime)
                    continue
                text = ast.unparse(child)
                for target in targets:
                    root = target.split(".")[0]
                    if root in HEAVY and not child_local and child_runtime:
                        heavy_direct[name].add(root)
                    if root == "ltc_ray" and resolve(target) != name:
                        imports.append(Import(name, resolve(target), child.lineno, text,
                                              child_local, child_runtime))
        visit(tree, False, True)
    return Graph(modules, imports, heavy_direct)


def heavy_of(graph: Graph) -> dict[str, frozenset[str]]:
    """The heavy packages loading each module pulls in: its own module-level imports, its
    module-level ``ltc_ray`` imports' (and their packages'), and its own packages'."""
    heavy = {m: set(h) for m, h in graph.heavy_direct.items()}
    deps = {m: {i.target for i in graph.top(m)} for m in graph.modules}
    for m in graph.modules:
        for dep in list(deps[m]) + [m]:
            deps[m].update(a for a in _ancestors(dep) if a in graph.modules)
    changed = True
    while changed:  # to a fixed point (cycles, in a graph with a violation, terminate)
        changed = False
        for m in graph.modules:
            for d in deps[m]:
                if not heavy[d] <= heavy[m]:
                    heavy[m] |= heavy[d]
                    changed = True
    return {m: frozenset(h) for m, h in heavy.items()}


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for layer, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or (p != "ltc_ray" and module.startswith(p + ".")):
                if best is None or len(p) > best[0]:
                    best = (len(p), layer)
    return None if best is None else best[1]


# ------------------------------------------------------------------ the rules
def unassigned(graph: Graph) -> list[str]:
    return [f"{m} belongs to no layer: add it to LAYERS in tests/test_layers.py"
            for m in sorted(graph.modules) if layer_of(m) is None]


def upward_imports(graph: Graph) -> list[str]:
    """(a) no import, module-level or in a function, of a higher layer."""
    out = []
    for i in graph.imports:
        src, dst = layer_of(i.source), layer_of(i.target)
        if src is not None and dst is not None and dst > src:
            out.append(f"{i.where()} imports {i.target} (layer {dst}) from layer {src}")
    return out


def import_cycles(graph: Graph) -> list[str]:
    """(b) no cycle among module-level imports. Importing ``a.b.c`` from outside ``a.b``
    also loads ``a.b``'s ``__init__``; a package importing its own children is fine, a
    child importing its own package while that package imports it is a cycle."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in graph.modules}
    for i in graph.imports:
        if i.local or not i.runtime:
            continue
        edges[i.source].setdefault(i.target, i)
        mine = set(_ancestors(i.source))
        for dst in _ancestors(i.target):  # loaded on the way, unless already loading
            if dst in graph.modules and dst not in mine and dst != i.source:
                edges[i.source].setdefault(dst, i)
    out, state, stack = [], dict.fromkeys(graph.modules, 0), []  # 0 new, 1 open, 2 done

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dst in sorted(edges[m]):
            if state[dst] == 1:
                cycle = stack[stack.index(dst):] + [dst]
                steps = [edges[a][b].where() for a, b in zip(cycle, cycle[1:], strict=False)]
                out.append("import cycle " + " -> ".join(cycle) + ": " + "; ".join(steps))
            elif state[dst] == 0:
                walk(dst)
        stack.pop()
        state[m] = 2

    for m in sorted(graph.modules):
        if state[m] == 0:
            walk(m)
    return out


def needless_local_imports(graph: Graph) -> list[str]:
    """(c) an ``ltc_ray`` import inside a function must load torch, faiss or Ray that the
    importing module does not already load: that is the only reason to defer it."""
    heavy = heavy_of(graph)
    out = []
    for i in graph.imports:
        if i.local and not heavy[i.target] - heavy[i.source]:
            has = ", ".join(sorted(heavy[i.source])) or "nothing heavy"
            out.append(f"{i.where()} is inside a function, but {i.target} loads nothing heavy "
                       f"that {i.source} lacks ({has}): import it at the top of the module")
    return out


def method_name_comparisons(graph: Graph, names: set[str]) -> list[str]:
    """(d) outside ``ltc_ray.cluster``, no code branches on a built-in method's name: a
    method's behaviour is its class's, not an ``if method == "..."`` elsewhere."""
    out = []
    for module, tree in sorted(graph.modules.items()):
        if module == "ltc_ray.cluster" or module.startswith("ltc_ray.cluster."):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.match_case):
                operands = [node.pattern]
            else:
                continue
            for operand in operands:
                for leaf in ast.walk(operand):
                    if isinstance(leaf, ast.Constant) and leaf.value in names:
                        out.append(f"{module}:{leaf.lineno} compares with the method name "
                                   f"{leaf.value!r} (`{ast.unparse(operand)[:80]}`): ask the "
                                   "method's class")
    return out


# ------------------------------------------------------------------ the package
def _package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = (path.read_text(), is_package)
    return sources


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(_package_sources())


def test_every_module_has_a_layer(graph):
    assert not unassigned(graph), "\n".join(unassigned(graph))


def test_no_import_goes_up_the_layers(graph):
    bad = upward_imports(graph)
    assert not bad, "\n".join(bad)


def test_module_level_imports_form_no_cycle(graph):
    bad = import_cycles(graph)
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_only_defer_torch_faiss_or_ray(graph):
    bad = needless_local_imports(graph)
    assert not bad, "\n".join(bad)


def test_method_names_are_compared_only_inside_cluster(graph):
    from ltc_ray.cluster import REGISTRY

    assert len(REGISTRY) >= 5  # the registry is really filled: the rule checks something
    bad = method_name_comparisons(graph, set(REGISTRY))
    assert not bad, "\n".join(bad)


def test_the_cli_stays_cheap_to_load(graph):
    """``--help`` and the argument checks run before torch, faiss or Ray load."""
    heavy = heavy_of(graph)
    cli = [m for m in graph.modules if layer_of(m) == len(LAYERS) - 1]
    assert len(cli) >= 8, cli
    loaded = {m: sorted(heavy[m]) for m in cli if heavy[m]}
    assert not loaded, f"CLI modules that load heavy packages at import: {loaded}"


# ------------------------------------------------------------------ each rule can fail
SYNTHETIC = {
    "ltc_ray": ("", True),
    "ltc_ray.io": ("", True),
    "ltc_ray.io.fs": ("import os\n", False),
    "ltc_ray.io.lock": ("from ltc_ray.io import fs\n", False),
    "ltc_ray.models": ("", True),
    "ltc_ray.models.net": (
        "import torch\nfrom ltc_ray.io.fs import os\n"
        "def rank():\n    from ltc_ray.cluster.base import higher_ranked\n", False),
    "ltc_ray.models.store": (
        "from ltc_ray.io.lock import x\n"
        "def load():\n    from ltc_ray.models.net import Net\n"  # allowed: adds torch
        "def lock():\n    from ltc_ray.io import lock\n", False),  # needless: nothing heavy
    "ltc_ray.cluster": ("import ray\nfrom ltc_ray.cluster import base, knn_cc\n", True),
    "ltc_ray.cluster.base": ("from ltc_ray.cluster.knn_cc import KnnCC\n", False),
    "ltc_ray.cluster.knn_cc": ("from .base import register\n", False),
    "ltc_ray.pipeline": ("import ray\nfrom . import job\n", True),
    "ltc_ray.pipeline.job": (
        "if method == 'knn-cc':\n    pass\n"
        "help = 'knn-cc is one method'\n", False),
    "ltc_ray.cli": ("from ltc_ray.cli import run\n", True),
    "ltc_ray.cli.run": ("from ltc_ray.cli import main\n"
                        "def go():\n    from ltc_ray.pipeline import job\n", False),
    "ltc_ray.stray": ("", False),
}


def test_the_checker_reports_each_kind_of_violation():
    g = build_graph(SYNTHETIC)
    assert unassigned(g) == [
        "ltc_ray.stray belongs to no layer: add it to LAYERS in tests/test_layers.py"]
    up = upward_imports(g)
    assert len(up) == 1 and up[0].startswith("ltc_ray.models.net:4 `from ltc_ray.cluster.base "
                                             "import higher_ranked` imports ltc_ray.cluster.base")
    cycles = import_cycles(g)
    assert any("ltc_ray.cluster.base -> ltc_ray.cluster.knn_cc -> ltc_ray.cluster.base" in c
               and "ltc_ray.cluster.knn_cc:1 `from .base import register`" in c
               for c in cycles), cycles
    assert any("ltc_ray.cli -> ltc_ray.cli.run -> ltc_ray.cli" in c for c in cycles), cycles
    assert len(cycles) == 2, cycles  # ltc_ray.cluster importing its children is not one
    local = needless_local_imports(g)
    assert len(local) == 1 and local[0].startswith(
        "ltc_ray.models.store:5 `from ltc_ray.io import lock` is inside a function"), local
    heavy = heavy_of(g)
    assert heavy["ltc_ray.cluster.knn_cc"] == {"ray"}  # through its package
    assert heavy["ltc_ray.models.store"] == frozenset()  # its torch import is deferred
    names = method_name_comparisons(g, {"knn-cc"})
    assert len(names) == 1 and names[0].startswith("ltc_ray.pipeline.job:1 compares with the "
                                                   "method name 'knn-cc'"), names


def test_a_package_importing_its_children_is_no_cycle():
    g = build_graph({"ltc_ray": ("from ltc_ray import a\n", True),
                     "ltc_ray.a": ("from ltc_ray.b import x\n", False),
                     "ltc_ray.b": ("", False)})
    assert import_cycles(g) == []
