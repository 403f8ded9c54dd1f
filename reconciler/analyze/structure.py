"""The deterministic half of `analyze`: walk, parse, build the graph. No model involved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.analyze.graph import Graph, build_graph
from reconciler.analyze.languages import LANGUAGES
from reconciler.analyze.languages.base import ParsedModule, count_lines
from reconciler.analyze.walk import SourceFile, walk


@dataclass
class LanguageTotals:
    files: int = 0
    lines: int = 0
    parsed: bool = False


@dataclass
class Structure:
    root: Path
    files: list[SourceFile]
    languages: dict[str, LanguageTotals]
    graph: Graph


def analyze_structure(root: Path) -> Structure:
    root = root.resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory; give the root of a source tree")
    files = walk(root)
    languages: dict[str, LanguageTotals] = {}
    modules: list[ParsedModule] = []
    for file in files:
        # -sig: a byte-order mark is not source (Python itself skips it; ast.parse would not).
        text = (root / file.path).read_text(encoding="utf-8-sig", errors="replace")
        language = file.language or "other"
        totals = languages.setdefault(language, LanguageTotals())
        totals.files += 1
        totals.lines += count_lines(text)
        if file.language in LANGUAGES:
            totals.parsed = True
            modules.append(LANGUAGES[file.language].parse(file.path, text))
    graph = build_graph(modules, {f.path for f in files}, root)
    ordered = dict(sorted(languages.items(), key=lambda item: (-item[1].lines, item[0])))
    return Structure(root, files, ordered, graph)
