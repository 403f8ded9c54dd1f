"""The dependency graph as a Mermaid flowchart. Node ids are sanitised (Mermaid ids are
letters, digits and underscores, and words like `end` break the parser); labels are quoted
and escaped; one subgraph per directory keeps middle-sized trees legible.

A large tree is drawn one node per directory instead (edges counted between directories),
because a few hundred modules make an unreadable hairball; and the text always stays under
Mermaid's `maxTextSize` (50,000 characters by default), past which it renders nothing.
Type-only edges are dashed; test modules are left out unless asked for."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath

from reconciler.analyze.graph import Graph
from reconciler.analyze.kinds import file_kind

MAX_EDGES = 400  # Mermaid's renderer gives up around 500 edges by default
MAX_CHARS = 45_000  # Mermaid's default maxTextSize is 50,000; leave room for the fence
MAX_MODULE_NODES = 120  # past this many modules a module-level drawing is a hairball
MAX_DIRECTORY_NODES = 60


def node_id(path: str, taken: set[str], prefix: str = "m_") -> str:
    base = prefix + re.sub(r"[^A-Za-z0-9_]", "_", path)
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


def label(text: str) -> str:
    escaped = (
        text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    )
    return f'"{escaped}"'


@dataclass(frozen=True)
class Diagram:
    text: str
    isolated: int  # modules without any edge: nothing to draw
    edges_left_out: int  # edges past the limit
    modules_left_out: int  # modules with edges, all of them past the limit
    level: str = "modules"  # or "directories": one node per directory of a large tree
    tests_left_out: int = 0  # test modules not drawn (--include-tests draws them)
    depth: int = 0  # directories: how many path segments name a node


def _priority(graph: Graph):
    """Which edges to keep when there are too many: those inside import cycles, then those
    leaving entry points (where reading starts), then the rest; by name within each."""
    component = {p: i for i, members in enumerate(graph.cycles()) for p in members}

    def key(edge: tuple[str, str]):
        source, target = edge
        in_cycle = source in component and component[source] == component.get(target)
        rank = 0 if in_cycle else 1 if source in graph.entry_points else 2
        return (rank, source, target)

    return key


def _arrow(dashed: bool) -> str:
    return "-.->" if dashed else "-->"


def _module_lines(graph: Graph, edges: list[tuple[str, str]]) -> list[str]:
    shown = sorted({p for edge in edges for p in edge})
    taken: set[str] = set()
    ids = {path: node_id(path, taken) for path in shown}
    in_cycle = {p for component in graph.cycles() for p in component}
    lines = ["flowchart LR"]
    by_directory: dict[str, list[str]] = {}
    for path in shown:
        by_directory.setdefault(str(PurePosixPath(path).parent), []).append(path)
    for directory, members in sorted(by_directory.items()):
        indent = "  "
        if directory != ".":
            lines.append(
                f"  subgraph {node_id('dir_' + directory, taken)}[{label(directory + '/')}]"
            )
            indent = "    "
        for path in members:
            lines.append(f"{indent}{ids[path]}[{label(graph.names[path])}]")
        if directory != ".":
            lines.append("  end")
    for source, target in edges:
        lines.append(f"  {ids[source]} {_arrow(graph.type_only((source, target)))} {ids[target]}")
    entry = [ids[p] for p in shown if p in graph.entry_points and graph.fan_in(p) == 0]
    cyclic = [ids[p] for p in shown if p in in_cycle]
    return [*lines, *_classes(entry, cyclic)]


def _classes(entry: list[str], cyclic: list[str]) -> list[str]:
    lines = [
        "  classDef entry fill:#e3f2fd,stroke:#1565c0",
        "  classDef cycle fill:#ffebee,stroke:#c62828",
    ]
    if entry:
        lines.append(f"  class {','.join(entry)} entry")
    if cyclic:
        lines.append(f"  class {','.join(cyclic)} cycle")
    return lines


def _directory_of(path: str, depth: int) -> str:
    parts = PurePosixPath(path).parent.parts
    return "/".join(parts[:depth]) or "."


def _directory_lines(graph: Graph, drawn: list[str], depth: int) -> tuple[list[str], int]:
    """One node per directory (cut to `depth` segments), one edge per pair of directories
    with the number of module dependencies behind it; dashed when all are type-only."""
    group = {p: _directory_of(p, depth) for p in drawn}
    members = Counter(group.values())
    counts: Counter[tuple[str, str]] = Counter()
    runtime: set[tuple[str, str]] = set()
    for source, target in graph.edges:
        if source in group and target in group and group[source] != group[target]:
            pair = (group[source], group[target])
            counts[pair] += 1
            if not graph.type_only((source, target)):
                runtime.add(pair)
    taken: set[str] = set()
    ids = {d: node_id(d, taken, "d_") for d in sorted(members)}
    lines = ["flowchart LR"]
    for directory, n in sorted(members.items()):
        name = "(top level)" if directory == "." else directory + "/"
        modules = f"{n} module" + ("s" if n != 1 else "")
        lines.append(f"  {ids[directory]}[{label(f'{name} ({modules})')}]")
    for (source, target), n in sorted(counts.items()):
        lines.append(
            f'  {ids[source]} {_arrow((source, target) not in runtime)}|"{n}"| {ids[target]}'
        )
    in_cycle = {group[p] for c in graph.cycles() for p in c if p in group}
    lines += _classes([], [ids[d] for d in sorted(in_cycle)])
    return lines, len(counts)


def mermaid(
    graph: Graph,
    max_edges: int | None = None,
    include_tests: bool = False,
    max_chars: int = MAX_CHARS,
) -> Diagram:
    """The diagram, with counts of what it leaves out."""
    limit = MAX_EDGES if max_edges is None else max_edges
    drawn = [p for p in graph.modules if include_tests or file_kind(p) != "test"]
    tests_left_out = len(graph.modules) - len(drawn)
    keep = set(drawn)
    candidates = [e for e in graph.edges if e[0] in keep and e[1] in keep]
    connected = {p for edge in candidates for p in edge}
    isolated = len(drawn) - len(connected)
    depth = max((len(PurePosixPath(p).parent.parts) for p in connected), default=0)
    directories = {_directory_of(p, depth) for p in connected}
    if len(connected) > MAX_MODULE_NODES and len(directories) > 1:
        for level in range(depth, 0, -1):
            groups = len({_directory_of(p, level) for p in connected})
            if not 2 <= groups <= MAX_DIRECTORY_NODES:  # one box says nothing
                continue
            lines, arrows = _directory_lines(graph, sorted(connected), level)
            text = "\n".join(lines)
            if len(text) <= max_chars and arrows <= limit:  # maxEdges holds here too
                return Diagram(text, isolated, 0, 0, "directories", tests_left_out, level)
    ordered = sorted(candidates, key=_priority(graph))
    kept = ordered[:limit]
    text = "\n".join(_module_lines(graph, sorted(kept)))
    while len(text) > max_chars and kept:  # never past what Mermaid renders
        kept = kept[: len(kept) * 9 // 10]
        text = "\n".join(_module_lines(graph, sorted(kept)))
    shown = {p for edge in kept for p in edge}
    return Diagram(
        text,
        isolated=isolated,
        edges_left_out=len(candidates) - len(kept),
        modules_left_out=len(connected) - len(shown),
        tests_left_out=tests_left_out,
    )
