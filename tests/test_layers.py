"""The product's layers point one way: retinagen's core < clinical < the interfaces (CLI, option checks,
dashboard service, shipped-model builder) < apps (the Streamlit UI); and no module imports itself back
through others. Read from the source (every import statement, function-level ones included)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retinagen", "clinical", "apps")
INTERFACES = frozenset({"retinagen.cli", "retinagen.options", "retinagen.dashboard_api", "retinagen.assets.make_shipped"})
LAYERS = ("core", "clinical", "interfaces", "apps")  # each may import only from itself and the layers before it


def layer_of(module: str) -> str:
    if any(module == i or module.startswith(i + ".") for i in INTERFACES):  # a package's submodules too
        return "interfaces"
    top = module.split(".")[0]
    return {"retinagen": "core", "clinical": "clinical", "apps": "apps"}[top]


def product_modules(root: Path = ROOT) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, module: str, known: Iterable[str]) -> set[str]:
    """The product modules ``module`` imports (absolute and relative, at any depth of the file)."""
    known = set(known)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # `from a.b import c` names module a.b.c or a name in a.b
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                add(f"{base}.{alias.name}")
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = product_modules(root)
    return {m: imports_of(p, m, mods) for m, p in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in g.items():
        for t in targets:
            if LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(m)):
                bad.append(f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), ignoring a package's imports of its own
    submodules (an ``__init__`` re-exporting them is not a cycle of design)."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_layers() -> None:
    assert upward_imports(graph()) == []


def test_there_is_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_every_interface_module_exists() -> None:
    assert set(product_modules()) >= INTERFACES  # a renamed interface cannot drop out of the contract


def test_the_check_sees_an_added_upward_import_and_cycle(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "retinagen" / "core_mod.py").write_text("def f():\n    from clinical.tool import x\n")
    (tmp_path / "clinical" / "tool.py").write_text("from . import helper\nx = 1\n")
    (tmp_path / "clinical" / "helper.py").write_text("import clinical.tool\n")
    (tmp_path / "apps" / "page.py").write_text("from retinagen import core_mod\nimport clinical.tool\n")
    g = graph(tmp_path)
    assert upward_imports(g) == ["retinagen.core_mod (core) imports clinical.tool (clinical)"]
    assert cycles(g) == [["clinical.helper", "clinical.tool"]]


def test_the_dr_scale_has_one_home() -> None:
    """The grade scale's numbers are defined once (retinagen/dr_scale.py) and imported everywhere else."""
    import re

    defined = []
    for module, path in product_modules().items():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"(NUM_GRADES|REFERABLE_GRADE|DR_GRADES|GRADE_NAMES)\s*=\s*[\d(\"']", line):
                defined.append(f"{module}:{n}")
    assert [d.split(":")[0] for d in defined] == ["retinagen.dr_scale"] * 3, defined
