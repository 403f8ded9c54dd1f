"""The module dependency graph: imports resolved to modules of the tree, fan-in and fan-out,
import cycles (Tarjan's strongly connected components) and entry points. Pure and
deterministic: the same tree gives the same graph, edge for edge."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.analyze.languages import LANGUAGES
from reconciler.analyze.languages.base import ImportRef, Language, ParsedModule, Resolver


@dataclass
class Graph:
    modules: dict[str, ParsedModule]  # by path, sorted
    names: dict[str, str]
    edges: dict[tuple[str, str], list[ImportRef]]  # (importer, imported) -> the imports behind it
    external: dict[str, list[str]] = field(default_factory=dict)  # path -> packages outside
    entry_points: dict[str, list[str]] = field(default_factory=dict)  # path -> reasons

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
        for source, target in sorted(self.edges):
            self._out.setdefault(source, []).append(target)
            self._in.setdefault(target, []).append(source)

    def cycles(self) -> list[list[str]]:
        """Every strongly connected component with more than one module, each sorted."""
        components = strongly_connected_components(list(self.modules), self.successors)
        return sorted(sorted(c) for c in components if len(c) > 1)

    def cycle_path(self, component: list[str]) -> list[str]:
        """One concrete loop through a component, starting and ending at its first module."""
        members = set(component)
        start = component[0]
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in self.successors(node):
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


def build_graph(modules: list[ParsedModule], files: set[str], root: Path) -> Graph:
    by_path = {m.path: m for m in sorted(modules, key=lambda m: m.path)}
    groups: dict[int, tuple[Language, list[ParsedModule]]] = {}
    for module in by_path.values():
        parser = LANGUAGES[module.language]
        groups.setdefault(id(parser), (parser, []))[1].append(module)
    owner: dict[str, Resolver] = {}
    for parser, members in groups.values():
        resolver = parser.resolver(members, files, root)
        for member in members:
            owner[member.path] = resolver
    edges: dict[tuple[str, str], list[ImportRef]] = {}
    external: dict[str, list[str]] = {}
    for path, module in by_path.items():
        resolver = owner[path]
        outside: set[str] = set()
        for ref in module.imports:
            resolution = resolver.resolve(module, ref)
            for target in resolution.targets:
                if target != path:
                    edges.setdefault((path, target), []).append(ref)
            if resolution.external:
                outside.add(resolution.external)
        if outside:
            external[path] = sorted(outside)
    graph = Graph(by_path, {p: owner[p].name(p) for p in by_path}, edges, external)
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
