"""The layering ARCHITECTURE.md promises, checked from the source: no import circle, and each layer
imports only the layers below it (the coding layer never a scheme, the API or the CLI)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wmtrace"
# A module may not import any module under these prefixes.
FORBIDDEN = {
    "wmtrace.coding": ("wmtrace.schemes", "wmtrace.pipeline", "wmtrace.api", "wmtrace.cli", "wmtrace.registry",
                       "wmtrace.formats", "wmtrace.attacks", "wmtrace.modelio"),
    "wmtrace.evidence": ("wmtrace.coding", "wmtrace.schemes", "wmtrace.pipeline", "wmtrace.api", "wmtrace.cli",
                         "wmtrace.registry", "wmtrace.formats", "wmtrace.attacks", "wmtrace.modelio",
                         "wmtrace.targets"),
    "wmtrace.registry": ("wmtrace.schemes", "wmtrace.pipeline", "wmtrace.api", "wmtrace.cli", "wmtrace.attacks"),
    "wmtrace.formats": ("wmtrace.schemes", "wmtrace.pipeline", "wmtrace.api", "wmtrace.cli", "wmtrace.registry"),
    "wmtrace.schemes": ("wmtrace.pipeline", "wmtrace.api", "wmtrace.cli", "wmtrace.attacks"),
    "wmtrace.attacks": ("wmtrace.pipeline", "wmtrace.api", "wmtrace.cli", "wmtrace.registry"),
    "wmtrace.pipeline": ("wmtrace.api", "wmtrace.cli", "wmtrace.attacks"),
    "wmtrace.api": ("wmtrace.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every wmtrace module a file imports, at top level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("wmtrace")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            if base.startswith("wmtrace"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(p) if m in modules and m != name} for name, p in modules.items()}


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for name, deps in graph().items():
        for prefix, banned in FORBIDDEN.items():
            if name == prefix or name.startswith(prefix + "."):
                wrong += [(name, d) for d in deps if any(d == b or d.startswith(b + ".") for b in banned)]
    assert not wrong


def test_no_import_circle():
    g = graph()
    # Package __init__ files re-export their children; an edge into a package is an edge into its __init__.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, path: list[str]) -> bool:
        state[n] = 1
        for d in sorted(g[n]):
            if d.startswith(n + "."):
                continue  # a package importing its own child is no circle
            if state.get(d) == 1:
                cycle.extend([*path, n, d])
                return True
            if d not in state and visit(d, [*path, n]):
                return True
        state[n] = 2
        return False

    for n in sorted(g):
        if n not in state and visit(n, []):
            break
    assert not cycle, " -> ".join(cycle)
