"""One cached tree-sitter parser per grammar, from the grammars bundled in
tree-sitter-language-pack (the 0.x line ships them in the wheel; no download at run time)."""

from __future__ import annotations

import threading
from functools import cache

from reconciler.analyze.languages.base import ParsedModule, count_lines
from reconciler.extras import require

_lock = threading.Lock()


@cache
def _parser(grammar: str):
    pack = require("tree_sitter_language_pack", "analyze", "tensorforge analyze")
    return pack.get_parser(grammar)


def parse_tree(grammar: str, source: str):
    with _lock:  # parsers are not thread-safe; parsing is fast next to everything else
        return _parser(grammar).parse(source.encode("utf-8"))


def parse_module(path: str, language: str, grammar: str, source: str):
    """A fresh ParsedModule for `path` and its syntax tree; syntax errors are noted on the
    module, not raised: a file the grammar half-understands still has imports worth mapping."""
    module = ParsedModule(path, language, count_lines(source), source)
    tree = parse_tree(grammar, source)
    if tree.root_node.has_error:
        module.errors.append("tree-sitter reported syntax errors")
    return module, tree


def walk(node):
    """Every named node under `node`, in source order (iterative: deep trees are no problem)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.named_children))
