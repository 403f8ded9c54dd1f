"""TypeScript (and JavaScript), parsed with tree-sitter: `import … from`, `export … from`,
`require()` and `import()`; relative specifiers resolve the way bundlers and tsc do
(extensions, index files, `./a.js` naming `a.ts`); bare specifiers are packages."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path, PurePosixPath

from reconciler.analyze.languages.base import (
    Definition,
    ImportRef,
    ParsedModule,
    Resolution,
    node_text,
)
from reconciler.analyze.languages.treesitter import parse_module, walk

DECLARATIONS = {
    "function_declaration": "function", "generator_function_declaration": "function",
    "class_declaration": "class", "abstract_class_declaration": "class",
    "interface_declaration": "interface", "type_alias_declaration": "type",
    "enum_declaration": "enum", "module": "namespace", "internal_module": "namespace",
}  # fmt: skip
EXTENSIONS = (".ts", ".tsx", ".d.ts", ".mts", ".cts", ".js", ".jsx", ".mjs", ".cjs")
ENTRY_NAMES = {"main.ts", "main.tsx", "index.ts", "index.tsx", "main.js", "index.js"}


def _grammar(path: str) -> str:
    if path.endswith(".tsx"):
        return "tsx"
    if path.endswith((".js", ".jsx", ".mjs", ".cjs")):
        return "javascript"
    return "typescript"


def _string(node) -> str | None:
    if node is None or node.type != "string":
        return None
    return "".join(node_text(c) for c in node.named_children if c.type == "string_fragment")


def _declarations(node, line_of) -> list[Definition]:
    found = []
    for child in node.named_children:
        target = child
        if child.type == "export_statement":
            target = child.child_by_field_name("declaration") or child
        if target.type in DECLARATIONS:
            name = node_text(target.child_by_field_name("name"))
            found.append(Definition(DECLARATIONS[target.type], name, line_of(target)))
        elif target.type in ("lexical_declaration", "variable_declaration"):
            for declarator in target.named_children:
                if declarator.type == "variable_declarator":
                    name = node_text(declarator.child_by_field_name("name"))
                    found.append(Definition("const", name, line_of(declarator)))
    return found


class TypeScriptLanguage:
    name = "typescript"

    def parse(self, path: str, source: str) -> ParsedModule:
        grammar = _grammar(path)
        language = "javascript" if grammar == "javascript" else "typescript"
        module, tree = parse_module(path, language, grammar, source)
        module.definitions = _declarations(tree.root_node, lambda n: n.start_point[0] + 1)
        for node in walk(tree.root_node):
            line = node.start_point[0] + 1
            if node.type in ("import_statement", "export_statement"):
                spec = _string(node.child_by_field_name("source"))
                if spec is not None:
                    module.imports.append(ImportRef(spec, line, node.type.split("_")[0]))
            elif node.type == "call_expression":
                function = node.child_by_field_name("function")
                arguments = node.child_by_field_name("arguments")
                kind = node_text(function) if function is not None else ""
                if (
                    kind in ("require", "import")
                    and arguments is not None
                    and arguments.named_children
                ):
                    spec = _string(arguments.named_children[0])
                    if spec is not None:
                        module.imports.append(ImportRef(spec, line, kind))
        module.imports.sort(key=lambda ref: (ref.line, ref.target))
        pure = PurePosixPath(path)
        if pure.name in ENTRY_NAMES and str(pure.parent) in (".", "src"):  # the package's own
            module.entry_hints.append(pure.name)
        return module

    def resolver(
        self, modules: list[ParsedModule], files: set[str], root: Path
    ) -> TypeScriptResolver:
        return TypeScriptResolver({m.path for m in modules}, files, root)


class TypeScriptResolver:
    def __init__(self, modules: set[str], files: set[str], root: Path) -> None:
        self.modules = modules
        self.entries = self._package_entries(files, root)

    def _package_entries(self, files: set[str], root: Path) -> dict[str, str]:
        """Files package.json names as main, module, types or bin: entry points."""
        entries: dict[str, str] = {}
        for manifest in sorted(f for f in files if PurePosixPath(f).name == "package.json"):
            try:
                data = json.loads((root / manifest).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            named = [data.get(key) for key in ("main", "module", "types")]
            binaries = data.get("bin")
            named += list(binaries.values()) if isinstance(binaries, dict) else [binaries]
            for spec in named:
                if isinstance(spec, str):
                    found = self._lookup(
                        posixpath.dirname(manifest), "./" + spec.removeprefix("./")
                    )
                    if found:
                        entries.setdefault(
                            found, f"package.json of {posixpath.dirname(manifest) or '.'}"
                        )
        return entries

    def name(self, path: str) -> str:
        return path

    def _lookup(self, directory: str, spec: str) -> str | None:
        joined = posixpath.normpath(posixpath.join(directory, spec))
        if joined.startswith("../"):
            return None
        stem = joined
        for js, ts in ((".js", ".ts"), (".jsx", ".tsx"), (".mjs", ".mts"), (".cjs", ".cts")):
            if joined.endswith(js):
                stem = joined[: -len(js)]
                if stem + ts in self.modules:
                    return stem + ts
        candidates = [
            joined,
            *(joined + e for e in EXTENSIONS),
            *(f"{joined}/index{e}" for e in EXTENSIONS),
        ]
        return next((c for c in candidates if c in self.modules), None)

    def resolve(self, module: ParsedModule, ref: ImportRef) -> Resolution:
        if ref.target.startswith((".", "/")):
            found = self._lookup(posixpath.dirname(module.path), ref.target)
            return Resolution((found,) if found else ())
        if ref.target.startswith("node:"):
            return Resolution()
        parts = ref.target.split("/")
        return Resolution(external="/".join(parts[:2]) if ref.target.startswith("@") else parts[0])


LANGUAGE = TypeScriptLanguage()
