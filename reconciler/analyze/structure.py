"""The deterministic half of `analyze`: walk, parse, build the graph. No model involved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.analyze.graph import Graph, build_graph
from reconciler.analyze.languages import LANGUAGES
from reconciler.analyze.languages.base import ParsedModule, count_lines
from reconciler.analyze.walk import LeftOut, SourceFile, walk_tree

# Languages whose files hold code with dependencies of their own; markdown or YAML left
# unparsed loses nothing, Go or Java does.
CODE_LANGUAGES = {
    "go", "java", "c", "cpp", "shell", "ruby", "kotlin", "swift", "csharp", "php", "scala",
    "lua", "zig", "haskell", "elixir",
}  # fmt: skip


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
    left_out: list[LeftOut]

    def not_parsed(self) -> dict[str, int]:
        """Programming languages present in the tree that no parser reads: their files are
        counted but their imports are not in the graph."""
        return {
            name: totals.files
            for name, totals in self.languages.items()
            if not totals.parsed and name in CODE_LANGUAGES
        }


def analyze_structure(root: Path) -> Structure:
    root = root.resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory; give the root of a source tree")
    tree = walk_tree(root)
    files, left_out = [], list(tree.left_out)
    languages: dict[str, LanguageTotals] = {}
    modules: list[ParsedModule] = []
    for file in tree.files:
        try:
            # -sig: a byte-order mark is not source (Python skips it; ast.parse would not).
            text = (root / file.path).read_text(encoding="utf-8-sig", errors="replace")
        except OSError as exc:  # changed since the walk looked at it
            left_out.append(
                LeftOut(file.path, f"unreadable ({exc.strerror or exc})", file.language)
            )
            continue
        files.append(file)
        language = file.language or "other"
        totals = languages.setdefault(language, LanguageTotals())
        totals.files += 1
        totals.lines += count_lines(text)
        if file.language in LANGUAGES:
            totals.parsed = True
            modules.append(LANGUAGES[file.language].parse(file.path, text))
    left_out.sort(key=lambda f: f.path)
    graph = build_graph(modules, {f.path for f in files}, root, left_out)
    ordered = dict(sorted(languages.items(), key=lambda item: (-item[1].lines, item[0])))
    return Structure(root, files, ordered, graph, left_out)
