"""The package's shape, read from the source with ``ast`` (nothing is imported, so this runs in milliseconds).

- Layers: each module belongs to one layer (LAYER_OF, longest matching prefix) and may import only its own
  layer and the layers ALLOWED lists. Data flows one way: cli -> bench -> deploy -> export -> (tuning,
  runtime) -> (encoder, data) -> util -> errors; ranking and tuning sit beside each other on encoder + data.
- No import cycles between modules: Tarjan's strongly connected components over the graph of every
  ``import`` / ``from ... import`` in a module, at module level and inside functions alike (a function-level
  import is still a dependency; it only defers the cost). Only a script's ``if __name__ == "__main__":``
  block is left out: run as a script the file is the module ``__main__``, not the library module.
- No module imports another module's ``_private`` name (``from a import _b`` or ``a._b``).
- No module over 400 lines; no function over 60 lines, counted from the first line of its body (docstring
  included) to its last, so a Typer command's option declarations in its signature do not count.
- Every subpackage says in its docstring what it is for and what it may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prtool"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60

LAYER_OF = {
    "prtool": "root",
    "prtool.__main__": "main",
    "prtool.errors": "errors",
    "prtool.util": "util",
    "prtool.testbed": "testbed.spec",  # the package itself: a docstring
    "prtool.testbed.spec": "testbed.spec",
    "prtool.testbed.data": "testbed.data",
    "prtool.testbed.eval_set": "testbed.data",
    "prtool.testbed.train": "testbed.build",
    "prtool.testbed.reference": "testbed.build",
    "prtool.encoder": "encoder",
    "prtool.data": "data",
    "prtool.runtime": "runtime",
    "prtool.ranking": "ranking",
    "prtool.tuning": "tuning",
    "prtool.export": "export",
    "prtool.deploy": "deploy",
    "prtool.bench": "bench",
    "prtool.cli": "cli",
}
_BASE = {"errors", "util"}
_CORE = _BASE | {"testbed.spec", "encoder", "data"}
ALLOWED = {
    "root": set(),
    "errors": set(),
    "util": {"errors"},
    "testbed.spec": set(),
    "testbed.data": _BASE | {"testbed.spec"},
    "encoder": _BASE | {"testbed.spec"},
    "data": _BASE | {"testbed.spec", "testbed.data"},
    "runtime": _BASE,
    "ranking": _CORE,
    "tuning": _CORE,
    "testbed.build": _CORE | {"testbed.data"},
    "export": _CORE | {"tuning", "runtime"},
    "deploy": _CORE | {"testbed.data", "tuning", "runtime", "export"},
    "bench": _CORE | {"testbed.data", "testbed.build", "ranking", "tuning", "runtime", "export", "deploy"},
    "cli": set(),  # filled below: everything
    "main": {"cli"},
}
ALLOWED["cli"] = set(ALLOWED) - {"main"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    """The layer of the longest prefix of ``module`` in LAYER_OF (``prtool`` itself only by exact name)."""
    parts = module.split(".")
    for n in range(len(parts), 1 if len(parts) > 1 else 0, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    return None


def _resolve(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'


def _library_nodes(module: str):
    """Every node of ``module`` but its ``if __name__ == "__main__":`` block: run as a script, the file is another
    module (``__main__``), so what that block imports is no dependency of the library module."""
    tree = TREES[module]
    for top in tree.body:
        if not _is_main_guard(top):
            yield from ast.walk(top)


def imports_of(module: str) -> list[tuple[str, int, str | None]]:
    """``(imported prtool module, line, imported name or None)`` for every import anywhere in ``module``."""
    out = []
    for node in _library_nodes(module):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, None) for a in node.names if a.name.split(".")[0] == "prtool"]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            if not src or src.split(".")[0] != "prtool":
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                out.append((sub, node.lineno, None) if sub in MODULES else (src, node.lineno, a.name))
    return [(m, line, name) for m, line, name in out if m in MODULES and m != module]


GRAPH = {m: sorted({dep for dep, _, _ in imports_of(m)}) for m in MODULES}


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module are the import cycles."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                out.append(sorted(comp))
    return out


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if layer_of(m) is None], "add these modules to LAYER_OF"


def test_no_import_cycles():
    cycles = [c for c in strongly_connected(GRAPH) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_tarjan_finds_a_cycle():
    comps = strongly_connected({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]})
    assert sorted(map(tuple, comps)) == [("a", "b", "c"), ("d",)]


def test_imports_follow_the_layers():
    bad = []
    for module in MODULES:
        mine = layer_of(module)
        if mine is None:
            continue  # test_every_module_has_a_layer names it
        for dep, line, _ in imports_of(module):
            theirs = layer_of(dep)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} ({mine}) imports {dep} ({theirs})")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def _private_uses(module: str) -> list[str]:
    path, found = MODULES[module].relative_to(ROOT), []
    aliases = {}  # local name -> prtool module
    for dep, line, name in imports_of(module):
        if name and name.startswith("_") and not name.startswith("__"):
            found.append(f"{path}:{line}: from {dep} import {name}")
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in MODULES})
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prtool":
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES})
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            target = ast.unparse(node.value)
            if aliases.get(target, target) in MODULES and aliases.get(target, target) != module:
                found.append(f"{path}:{node.lineno}: {target}.{node.attr}")
    return found


def test_no_module_imports_a_private_name():
    bad = [use for m in MODULES for use in _private_uses(m)]
    assert not bad, "make these public (or move them):\n" + "\n".join(bad)


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def test_modules_are_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in _sources()}
    big = [f"{p}: {n}" for p, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_short():
    long = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.body[0].lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("package", sorted({m.split(".")[1] for m in MODULES if m.count(".") >= 2}))
def test_each_subpackage_says_its_role_and_imports(package):
    doc = ast.get_docstring(TREES[f"prtool.{package}"]) or ""
    assert "May import:" in doc and len(doc.split("May import:")[0].strip()) > 20, f"prtool/{package}/__init__.py"
