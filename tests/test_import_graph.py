"""The package's import graph, read from the source with `ast` (nothing is imported): no
cycles anywhere in reconciler/, and the gateway in layers (surfaces on top, depending
downward only).

Every import statement counts: module-level ones, those inside functions, and those under
`if TYPE_CHECKING:` (a cycle that only the type checker sees is still two modules that
cannot be understood apart). Relative imports are resolved against the importing module's
package; `from package import name` counts as importing the submodule when `name` is one."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reconciler"


def _modules(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Dotted module name -> (file, the package its relative imports are resolved in)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _parse(path: Path) -> ast.Module:
    """`ast.parse` with the collector off: on Python 3.11 a finalizer that runs during the
    parse and itself parses (a traceback's caret, logging a destroyed task) breaks the parse
    with "AST constructor recursion depth mismatch" (CPython gh-106905)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(encoding="utf-8"), str(path))
    finally:
        if enabled:
            gc.enable()


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (outside modules are left out)."""
    modules = _modules(root)

    def known(name: str) -> str | None:
        while name and name not in modules:  # `a.b.Class` is module `a.b`
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Import):
                targets.update(t for alias in node.names if (t := known(alias.name)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from ..x import y` in a.b.c is a.x
                    anchor = package[: len(package) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in modules else known(base)
                    if target:
                        targets.add(target)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_graph_sees_relative_function_level_and_type_checking_imports(tmp_path):
    """The reader itself: a cycle made only of a relative import, an import inside a function
    and one under TYPE_CHECKING is found and named, so the real test cannot pass by blindness."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n"
    )
    graph = import_graph(pkg)
    assert (
        graph["pkg.a"] == {"pkg.sub.b"}
        and graph["pkg.sub.b"] == {"pkg.c"}
        and graph["pkg.c"] == {"pkg.a"}
    )
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert len(graph) > 100 and "reconciler.gateway.app" in graph  # it read the real package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The gateway's surfaces, by group: each renders requests and errors in its own shape.
GATEWAY = "reconciler.gateway."
SURFACES = {
    "app": ("app", "server", "openapi"),  # assembles the rest; the small endpoints
    "openai": ("openai_api",),
    "ollama": ("ollama_api", "ollama"),
    "websocket": ("websocket",),
    "ops": ("ops_api", "ops_status", "telemetry", "ui", "events"),
}
# Lower layers that must not reach up: moving bytes never depends on admission or routing,
# routing and admission never on the core that assembles them.
NOT_ABOVE = {
    "proxy": ("admission", "routed", "request_body", "core"),
    "proxy_call": ("proxy", "admission", "routed", "core"),
    "transport": ("proxy", "admission", "routed", "core"),
    "router": ("proxy", "admission", "routed", "core"),
    "errors": ("proxy", "admission", "routed", "core", "metrics"),
    "admission": ("routed", "core", "proxy"),
    "request_body": ("routed", "core", "proxy", "admission"),
    "routed": ("core", "admission"),
}


def _group(module: str) -> str | None:
    if not module.startswith(GATEWAY):
        return None
    rest = module[len(GATEWAY) :]
    for group, names in SURFACES.items():
        if any(rest == n or rest.startswith(n + ".") for n in names):
            return group
    return "lower"


def test_gateway_layers_depend_downward_only():
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        group = _group(module)
        if group is None:
            continue
        for target in sorted(targets):
            to = _group(target)
            if to is None or to == group or to == "lower":
                continue
            # A surface reaches only down; only app (the assembly) reaches across into surfaces.
            if group != "app":
                wrong.append(f"{module} ({group}) imports {target} ({to})")
    for lower, forbidden in NOT_ABOVE.items():
        for target in sorted(graph[GATEWAY + lower]):
            if any(target == GATEWAY + f for f in forbidden):
                wrong.append(f"{GATEWAY}{lower} imports {target}, a layer above it")
    assert not wrong, "\n".join(wrong)
    importers = sorted(
        m for m, t in graph.items() if GATEWAY + "app" in t and m.startswith(GATEWAY)
    )
    assert importers == [], f"nothing in the gateway may import the app: {importers}"
