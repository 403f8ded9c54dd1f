"""The dependency graph as a Mermaid flowchart. Node ids are sanitised (Mermaid ids are
letters, digits and underscores, and words like `end` break the parser); labels are quoted
and escaped; one subgraph per directory keeps large trees legible."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from reconciler.analyze.graph import Graph

MAX_EDGES = 400  # Mermaid's renderer gives up around 500 edges by default


def node_id(path: str, taken: set[str]) -> str:
    base = "m_" + re.sub(r"[^A-Za-z0-9_]", "_", path)
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


def mermaid(graph: Graph, max_edges: int | None = None) -> Diagram:
    """The diagram, with counts of what it leaves out."""
    limit = MAX_EDGES if max_edges is None else max_edges
    kept = sorted(graph.edges, key=_priority(graph))[:limit]
    edges = sorted(kept)
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
        lines.append(f"  {ids[source]} --> {ids[target]}")
    entry = [ids[p] for p in shown if p in graph.entry_points and graph.fan_in(p) == 0]
    cyclic = [ids[p] for p in shown if p in in_cycle]
    lines.append("  classDef entry fill:#e3f2fd,stroke:#1565c0")
    lines.append("  classDef cycle fill:#ffebee,stroke:#c62828")
    if entry:
        lines.append(f"  class {','.join(entry)} entry")
    if cyclic:
        lines.append(f"  class {','.join(cyclic)} cycle")
    connected = {p for edge in graph.edges for p in edge}
    return Diagram(
        "\n".join(lines),
        isolated=len(graph.modules) - len(connected),
        edges_left_out=len(graph.edges) - len(edges),
        modules_left_out=len(connected) - len(shown),
    )
