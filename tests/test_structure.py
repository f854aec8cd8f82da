"""Package structure: every implementation module is reachable as a module, and imports form no cycle."""

import ast
import importlib
import pathlib
import pkgutil
import types

import jaxopt_big

ROOT = pathlib.Path(jaxopt_big.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "jaxopt_big."))


def _source(name: str) -> pathlib.Path:
    rel = pathlib.Path(*name.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.exists() else (ROOT / rel).with_suffix(".py")


def _imports(name: str, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its source (inner functions too)."""
    path = _source(name)
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_imports_as_a_module_no_function_shadows_it():
    names = _modules()
    assert "jaxopt_big.quant._cluster" in names and "jaxopt_big.tree" in names
    for name in names:
        parent, _, leaf = name.rpartition(".")
        importlib.import_module(name)
        attr = getattr(importlib.import_module(parent), leaf)
        assert isinstance(attr, types.ModuleType), f"{name} is shadowed by {attr!r}"


def test_no_import_cycle_between_modules():
    names = set(_modules()) | {"jaxopt_big"}
    # A package's __init__ re-exports its modules; edges into a package mean "its __init__".
    graph = {n: {m for m in _imports(n, names) if not (n.startswith(m + ".") and m != n)} for n in names}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
