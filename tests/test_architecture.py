"""The package's shape, checked from its source: imports flow one way (no cycle), the data layer
stands on its own, the models know nothing of training, prediction or the command line, and every
torch ``Dataset`` lives in ``fusion/data/``.

Every import counts, at module level or inside a function, absolute or relative; ``from a.b
import c`` is an import of the module ``a.b.c`` when there is one, else of ``a.b``. A rule broken
through another module (``fusion.data`` importing ``fusion.plots`` importing something above the
data layer) is broken too: the chain is printed.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pytest

import fusion

SOURCE = Path(fusion.__file__).resolve().parent.parent  # the folder holding the package
PACKAGE = "fusion"
DATA = "fusion.data"
# What the data layer may import besides itself (and what those import in turn).
DATA_MAY_IMPORT = {"fusion.errors", "fusion.io", "fusion.plots", "fusion.metrics"}
MODELS = "fusion.models"
MODELS_MAY_NOT_IMPORT = {
    "fusion.task", "fusion.cli", "fusion.experiments", "fusion.predict", "fusion.data",
}  # fmt: skip
DATASET_BASES = {"Dataset", "IterableDataset"}

Graph = Mapping[str, set[str]]


# ---------------------------------------------------------------------------------- reading


def modules(source: Path, package: str) -> dict[str, Path]:
    """Dotted name → file of every module of ``package`` under ``source`` (``__init__.py`` is its
    package)."""
    out = {}
    for path in sorted((source / package).rglob("*.py")):
        parts = path.relative_to(source).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _known(name: str, known: Collection[str]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of ``known``."""
    while name not in known:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def imported(module: str, path: Path, known: Collection[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (the file ``path``) imports, anywhere in it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.update(_known(f"{base}.{alias.name}", known) for alias in node.names)
    return {name for name in found if name is not None and name != module}


def import_graph(source: Path, package: str) -> dict[str, set[str]]:
    """Module → the package's modules it imports."""
    files = modules(source, package)
    return {name: imported(name, path, files) for name, path in files.items()}


def datasets(source: Path, package: str) -> dict[str, str]:
    """``module.Class`` → module of every class deriving from a torch ``Dataset`` (a base named
    ``Dataset`` or ``IterableDataset``, plain, dotted or subscripted)."""
    out = {}
    for module, path in modules(source, package).items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef) and any(map(_is_dataset, node.bases)):
                out[f"{module}.{node.name}"] = module
    return out


def _is_dataset(base: ast.expr) -> bool:
    if isinstance(base, ast.Subscript):
        base = base.value
    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
    return name in DATASET_BASES


# ---------------------------------------------------------------------------------- checking


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of mutually importing modules (each
    strongly connected component of more than one module), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                out.append(_cycle_in(graph, group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _cycle_in(graph: Graph, group: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``group`` (mutually reachable modules)."""
    start = min(group)
    for nxt in sorted(graph[start] & group):
        path = _path(graph, nxt, {start}, within=group)
        if path:
            return [start, *path]
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def _path(graph: Graph, start: str, targets: Collection[str], within: Collection[str]) -> list[str]:
    """A shortest import chain ``[start, ..., target]`` to any of ``targets`` through modules of
    ``within`` (``[]`` if none)."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node in targets:
            chain = [node]
            while (prev := parent[chain[-1]]) is not None:
                chain.append(prev)
            return chain[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in parent and (nxt in within or nxt in targets):
                parent[nxt] = node
                queue.append(nxt)
    return []


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def reachable(graph: Graph, module: str) -> Iterator[list[str]]:
    """Every import chain ``[module, ..., m]`` that first reaches each module ``m`` (shortest)."""
    for target in sorted(graph):
        if target != module and (chain := _path(graph, module, {target}, within=graph)):
            yield chain


def layer_violations(graph: Graph, layer: str, allowed: Collection[str]) -> list[list[str]]:
    """Import chains from a module of ``layer`` to one outside ``layer`` and ``allowed``,
    through modules of ``layer`` and ``allowed`` only (so each chain names the first step out)."""
    inside = [m for m in graph if _inside(m, layer)]
    ok = {*inside, *allowed}
    out = []
    for module in sorted(inside):
        for target in sorted(graph):
            if target not in ok:
                chain = _path(graph, module, {target}, within=ok)
                if chain:
                    out.append(chain)
    return out


def forbidden_chains(graph: Graph, layer: str, forbidden: Collection[str]) -> list[list[str]]:
    """Import chains, direct or through other modules, from a module of ``layer`` to a module
    inside one of ``forbidden``."""
    return [
        chain
        for module in sorted(graph)
        if _inside(module, layer)
        for chain in reachable(graph, module)
        if any(_inside(chain[-1], f) for f in forbidden)
    ]


def _show(chains: list[list[str]]) -> str:
    return "\n".join(" -> ".join(chain) for chain in chains)


# ---------------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SOURCE, PACKAGE)


def test_the_graph_sees_every_module_and_kind_of_import(graph: dict[str, set[str]]) -> None:
    assert {"fusion", "fusion.cli", "fusion.data.series", "fusion.models.vit"} <= set(graph)
    assert "fusion.data.series" in graph["fusion.data.datamodule"]  # module level
    assert "fusion.bench.data" in graph["fusion.cli"]  # inside a function
    assert "fusion.experiments" in graph["fusion.cli"]  # from fusion import experiments


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + _show(found)


def test_the_data_layer_imports_only_itself_and_its_helpers(graph: dict[str, set[str]]) -> None:
    bad = layer_violations(graph, DATA, DATA_MAY_IMPORT)
    assert not bad, f"{DATA} may import only {sorted(DATA_MAY_IMPORT)}:\n" + _show(bad)


def test_the_models_know_nothing_of_data_training_or_the_command_line(
    graph: dict[str, set[str]],
) -> None:
    bad = forbidden_chains(graph, MODELS, MODELS_MAY_NOT_IMPORT)
    assert not bad, f"{MODELS} imports {sorted(MODELS_MAY_NOT_IMPORT)}:\n" + _show(bad)


def test_datasets_live_in_the_data_layer() -> None:
    found = datasets(SOURCE, PACKAGE)
    assert "fusion.data.datasets.PairedDataset" in found  # the detector sees the real one
    outside = {name for name, module in found.items() if not _inside(module, DATA)}
    assert not outside, f"Dataset classes outside {DATA}: {outside}"


# ---------------------------------------------------------------------------------- self-check


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_catch_a_synthetic_package(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/top.py": "import pkg.low.b\n",
            "pkg/low/__init__.py": "",
            # a -> b (inside a function, from-import of a submodule), b -> c (relative),
            # c -> a (absolute, dotted): a cycle no single file shows.
            "pkg/low/a.py": "def f():\n    from pkg.low import b\n",
            "pkg/low/b.py": "from .c import thing\n",
            "pkg/low/c.py": "import pkg.low.a as a\nthing = 1\n",
            "pkg/low/d.py": "from ..helper import x\n",  # out of the layer through a helper
            "pkg/helper.py": "import pkg\nfrom pkg import top\nx = 1\n",
            "pkg/ds.py": (
                "from torch.utils import data\n"
                "class A(data.Dataset[int]): ...\n"
                "class B(IterableDataset): ...\n"
                "class C(object): ...\n"
            ),
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.low.a"] == {"pkg.low.b"}
    assert graph["pkg.low.b"] == {"pkg.low.c"}
    assert graph["pkg.low.c"] == {"pkg.low.a"}
    assert graph["pkg.low.d"] == {"pkg.helper"}
    assert graph["pkg.helper"] == {"pkg", "pkg.top"}
    assert cycles(graph) == [["pkg.low.a", "pkg.low.b", "pkg.low.c", "pkg.low.a"]]
    assert cycles({**graph, "pkg.low.c": set()}) == []
    assert layer_violations(graph, "pkg.low", {"pkg.helper"}) == [
        ["pkg.low.d", "pkg.helper", "pkg"],
        ["pkg.low.d", "pkg.helper", "pkg.top"],
    ]
    assert layer_violations(graph, "pkg.low", {"pkg", "pkg.helper", "pkg.top"}) == []
    assert forbidden_chains(graph, "pkg.low", {"pkg.top"}) == [
        ["pkg.low.d", "pkg.helper", "pkg.top"]
    ]
    assert set(datasets(tmp_path, "pkg")) == {"pkg.ds.A", "pkg.ds.B"}
