"""The shape of the house (DESIGN.md "Layout"): imports point one way, modules keep their private
names to themselves, abstract bases are abc classes, and the core never imports a built-in plugin."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "measureflow"
PLUGINS = ROOT / "plugins"


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules(root: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, root, package): p for p in root.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def _imports(path: Path, module: str, known: dict[str, Path]):
    """(imported module, line, names) for every import statement anywhere in the file (module level
    and inside functions), resolved to the modules of ``known``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            names = tuple(a.name for a in node.names)
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            if submodules:
                for sub in submodules:
                    yield sub, node.lineno, ()
                rest = tuple(n for n in names if f"{base}.{n}" not in known)
                if rest:
                    yield base, node.lineno, rest
            else:
                yield base, node.lineno, names


def _graph():
    known = _modules(CORE, "measureflow")
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for target, _, _ in _imports(path, module, known):
            if target in known and target != module:
                edges[module].add(target)
    return edges


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_measureflow():
    # Every import counts, at module level or inside a function: a lazy import that closes a cycle
    # is still a cycle. A package's __init__ may import its own modules (it is their facade), and
    # the top-level facade `measureflow/__init__.py` re-exports the core; nothing imports back
    # through them, so those edges are left out.
    edges = _graph()
    for module in edges:
        edges[module] = {t for t in edges[module]
                         if not (CORE / Path(*t.split(".")[1:]) / "__init__.py").exists() or t == module}
    assert _cycles(edges) == []


def test_nothing_in_measureflow_imports_through_a_package_facade_it_belongs_to():
    # `from measureflow import X` (or `from . import X` for a non-module X) inside the package would
    # make the facade a hub of cycles; import X from the module that defines it.
    known = _modules(CORE, "measureflow")
    offenders = []
    for module, path in known.items():
        for target, line, names in _imports(path, module, known):
            if names and (CORE / Path(*target.split(".")[1:]) / "__init__.py").exists() and target != module \
                    and module.startswith(target + ".") and names != ("__version__",):
                offenders.append(f"{path.relative_to(ROOT)}:{line} from {target} import {', '.join(names)}")
    assert offenders == []


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for root, package in ((CORE, "measureflow"), (PLUGINS, "measureflow_plugins")):
        known = _modules(root, package)
        for module, path in known.items():
            for target, line, names in _imports(path, module, known):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private and target.startswith(("measureflow", "measureflow_plugins")):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} {target}: {private}")
    assert offenders == []


def test_no_not_implemented_error_base_classes():
    offenders = []
    for path in [*CORE.rglob("*.py"), *PLUGINS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_core_never_imports_a_builtin_plugin_and_plugins_never_import_each_other():
    core = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.startswith("measureflow_plugins") for n in names):
                    core.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert core == []
    cross = []
    for path in PLUGINS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("measureflow_plugins")):
                cross.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert cross == []


def test_the_cycle_detector_sees_a_cycle():
    # A test that cannot fail proves nothing: the detector finds a two-module and a three-module cycle.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
