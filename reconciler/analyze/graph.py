"""The module dependency graph: imports resolved to modules of the tree, fan-in and fan-out,
import cycles (Tarjan's strongly connected components) and entry points. Pure and
deterministic: the same tree gives the same graph, edge for edge.

An edge whose every import is needed only by the type checker (`if TYPE_CHECKING:`,
`import type`) is type-only: it is kept and marked, but cycles are counted over run-time
edges, and loops that exist only through type-only edges are listed apart."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.analyze.languages import LANGUAGES
from reconciler.analyze.languages.base import ImportRef, Language, ParsedModule, Resolver
from reconciler.analyze.walk import LeftOut


@dataclass(frozen=True)
class Unresolved:
    """An import naming something of the tree that the tree does not provide (or that the
    walk left out), with the reason."""

    source: str  # the importing module's path
    target: str  # the import as written
    line: int
    reason: str


@dataclass
class Graph:
    modules: dict[str, ParsedModule]  # by path, sorted
    names: dict[str, str]
    edges: dict[tuple[str, str], list[ImportRef]]  # (importer, imported) -> the imports behind it
    external: dict[str, list[str]] = field(default_factory=dict)  # path -> packages outside
    entry_points: dict[str, list[str]] = field(default_factory=dict)  # path -> reasons
    unresolved: list[Unresolved] = field(default_factory=list)

    def type_only(self, edge: tuple[str, str]) -> bool:
        return all(ref.type_only for ref in self.edges[edge])

    def successors(self, path: str) -> list[str]:
        return self._out.get(path, [])

    def predecessors(self, path: str) -> list[str]:
        return self._in.get(path, [])

    def fan_in(self, path: str) -> int:
        return len(self.predecessors(path))

    def fan_out(self, path: str) -> int:
        return len(self.successors(path))

    def __post_init__(self) -> None:
        self._out: dict[str, list[str]] = {}
        self._in: dict[str, list[str]] = {}
        self._runtime: dict[str, list[str]] = {}
        for source, target in sorted(self.edges):
            self._out.setdefault(source, []).append(target)
            self._in.setdefault(target, []).append(source)
            if not self.type_only((source, target)):
                self._runtime.setdefault(source, []).append(target)
        self._cycles: dict[bool, list[list[str]]] = {}

    def runtime_successors(self, path: str) -> list[str]:
        return self._runtime.get(path, [])

    def _components(self, runtime: bool) -> list[list[str]]:
        if runtime not in self._cycles:
            successors = self.runtime_successors if runtime else self.successors
            components = strongly_connected_components(list(self.modules), successors)
            self._cycles[runtime] = sorted(sorted(c) for c in components if len(c) > 1)
        return self._cycles[runtime]

    def cycles(self) -> list[list[str]]:
        """Every strongly connected component of run-time edges with more than one module,
        each sorted."""
        return self._components(runtime=True)

    def type_only_cycles(self) -> list[list[str]]:
        """Components that exist only once type-only edges are counted (or grow with them)."""
        runtime = {tuple(c) for c in self.cycles()}
        return [c for c in self._components(runtime=False) if tuple(c) not in runtime]

    def cycle_path(self, component: list[str], runtime: bool = True) -> list[str]:
        """One concrete loop through a component, starting and ending at its first module."""
        successors = self.runtime_successors if runtime else self.successors
        members = set(component)
        start = component[0]
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in successors(node):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in previous:
                    previous[nxt] = node
                    queue.append(nxt)
        return [*component, start]


def _order(item: Unresolved) -> tuple[str, int, str]:
    return (item.source, item.line, item.target)


def strongly_connected_components(nodes: list[str], successors) -> list[list[str]]:
    """Tarjan's algorithm, iterative so deep import chains cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(successors(root)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors(child))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def build_graph(
    modules: list[ParsedModule], files: set[str], root: Path, skipped: Sequence[LeftOut] = ()
) -> Graph:
    """`skipped` are the files the walk did not read: they take part in resolution as empty
    stand-ins, so an import of one is reported with the reason instead of being resolved to
    something else (a package's __init__.py) or dropped."""
    left_out = {f.path: f.reason for f in skipped}
    stand_ins = [
        LANGUAGES[f.language].parse(f.path, "")
        for f in skipped
        if f.language in LANGUAGES and f.path not in files
    ]
    files = files | {m.path for m in stand_ins}
    everything = {m.path: m for m in sorted([*modules, *stand_ins], key=lambda m: m.path)}
    by_path = {p: m for p, m in everything.items() if p not in left_out}
    groups: dict[int, tuple[Language, list[ParsedModule]]] = {}
    for module in everything.values():
        parser = LANGUAGES[module.language]
        groups.setdefault(id(parser), (parser, []))[1].append(module)
    owner: dict[str, Resolver] = {}
    for parser, members in groups.values():
        resolver = parser.resolver(members, files, root)
        for member in members:
            owner[member.path] = resolver
    edges: dict[tuple[str, str], list[ImportRef]] = {}
    external: dict[str, list[str]] = {}
    unresolved: list[Unresolved] = []
    for path, module in by_path.items():
        resolver = owner[path]
        outside: set[str] = set()
        for ref in module.imports:
            resolution = resolver.resolve(module, ref)
            for target in resolution.targets:
                if target in left_out:
                    reason = f"{target} is left out: {left_out[target]}"
                    unresolved.append(Unresolved(path, ref.target, ref.line, reason))
                elif target != path:
                    edges.setdefault((path, target), []).append(ref)
            if resolution.external:
                outside.add(resolution.external)
            if resolution.unresolved:
                unresolved.append(Unresolved(path, ref.target, ref.line, resolution.unresolved))
        if outside:
            external[path] = sorted(outside)
    names = {p: owner[p].name(p) for p in by_path}
    graph = Graph(by_path, names, edges, external, unresolved=sorted(set(unresolved), key=_order))
    for path, module in by_path.items():
        reasons = list(module.entry_hints)
        declared = owner[path].entries.get(path)
        if declared:
            reasons.append(declared)
        # A package's __init__ or an empty file is not imported by name; it is no entry point.
        if graph.fan_in(path) == 0 and not path.endswith("__init__.py") and module.source.strip():
            reasons.append("nothing in the tree imports it")
        if reasons:
            graph.entry_points[path] = reasons
    return graph
